"""Fine-tune a pretrained LLM on GSM8K with LoRA-SB (or LoRA, LoRA-XS, full fine-tuning) and evaluate it.

One GPU (Qwen/Qwen2.5-0.5B, LoRA-SB rank 96 on the seven projections, GSM8K train, then GSM8K test accuracy):
    python train_gsm8k.py
A baseline is one flag away:
    python train_gsm8k.py --method lora      # or loraxs, full
Several GPUs (the first-update estimate is summed over ranks, data is sharded, rank 0 writes):
    torchrun --nproc_per_node=8 train_gsm8k.py
Quick check on CPU with a local model folder and the GSM8K files:
    python train_gsm8k.py --model path/to/model --data_dir path/to/gsm8k --device cpu --max_steps 5 --eval_limit 8
The paper's arithmetic setting (Mistral-7B, MetaMathQA first 50K, rank 96, 1 epoch):
    python train_gsm8k.py --model mistralai/Mistral-7B-v0.1 --train_data metamathqa --num_train 50000 \
        --rank 96 --epochs 1 --weight_decay 0.01
"""

import argparse
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import lorasb
import model as model_lib

METHODS = ("lorasb", "loraxs", "lora", "full")
MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")
DEFAULT_RANK = {"lorasb": 96, "loraxs": 96, "lora": 32}  # the paper's Table 1 ranks


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen2.5-0.5B", help="hub name or local folder (config.json, safetensors, tokenizer)")
    a("--method", default="lorasb", help=f"one of {', '.join(METHODS)}")
    a("--rank", type=int, default=None, help="adapter rank (default: 96 for lorasb/loraxs, 32 for lora)")
    a("--lora_alpha", type=float, default=None, help="LoRA only: scale = alpha / rank (default: 2 * rank)")
    a("--targets", default=",".join(lorasb.DEFAULT_TARGETS), help="comma-separated module-name suffixes to adapt")
    a("--train_data", default="gsm8k", help="gsm8k or metamathqa")
    a("--num_train", type=int, default=None, help="use the first N training examples (metamathqa default: 50000)")
    a("--data_dir", default=None, help="folder with GSM8K train.jsonl and test.jsonl (default: download and cache)")
    a("--metamathqa_path", default=None, help="local MetaMathQA .json/.jsonl (default: download from the hub)")
    a("--epochs", type=int, default=3, help="passes over the training set")
    a("--max_steps", type=int, default=None, help="stop the schedule after this many optimizer steps")
    a("--lr", type=float, default=1e-4, help="peak learning rate (the paper's arithmetic setting)")
    a("--warmup_ratio", type=float, default=0.02, help="linear warmup over this fraction of the steps, then cosine")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay (the authors' code used 0.01 by accident)")
    a("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0 disables)")
    a("--batch_size", type=int, default=32, help="examples per optimizer step, over all GPUs")
    a("--micro_batch_size", type=int, default=4, help="examples per forward pass on one GPU")
    a("--max_length", type=int, default=512, help="truncate training examples to this many tokens")
    a("--num_init_samples", type=int, default=None, help="examples for the first-update estimate "
      "(default: 0.1%% of the training set, at least 32)")
    a("--init_rule", default="adamw", help="first-step model: adamw (-lr_1 * sign G) or sgd (-lr_1 * mean G)")
    a("--init_svd", default="exact", help="exact or randomized SVD for the initialization")
    a("--init_accumulate_on", default="device", help="where the fp32 gradient sums live: device or cpu")
    a("--eval_limit", type=int, default=None, help="evaluate on the first N test questions (default: all 1319)")
    a("--eval_batch_size", type=int, default=64, help="prompts per generation batch")
    a("--max_new_tokens", type=int, default=256, help="generation budget per question (the authors' 256)")
    a("--eval_only", action="store_true", help="skip training; evaluate --model (with --adapter if given)")
    a("--adapter", default=None, help="with --eval_only: an adapter.safetensors saved by this script")
    a("--out_dir", default=None, help="where outputs go (default: runs/gsm8k-<method>-r<rank>, runs/gsm8k-eval)")
    a("--overwrite", action="store_true", help="start over in an existing out_dir (its checkpoints are deleted)")
    a("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    a("--save_every", type=int, default=200, help="checkpoint every N optimizer steps (and at the end)")
    a("--log_every", type=int, default=10, help="print and log metrics every N optimizer steps")
    a("--seed", type=int, default=42)
    a("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    a("--dtype", default=None, help="model weights: bfloat16 or float32 (default: bf16 on GPU, fp32 on CPU)")
    a("--compile", action="store_true", help="torch.compile the model for training")
    args = p.parse_args(argv)
    if args.rank is None and args.method in DEFAULT_RANK:
        args.rank = DEFAULT_RANK[args.method]
    if args.lora_alpha is None and args.method == "lora" and args.rank:
        args.lora_alpha = 2.0 * args.rank
    if args.out_dir is None:
        run = "eval" if args.eval_only else args.method + (f"-r{args.rank}" if args.rank else "")
        args.out_dir = os.path.join("runs", f"gsm8k-{run}")
    args.targets = tuple(t for t in args.targets.split(",") if t)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Checking the request before any long work.
# ---------------------------------------------------------------------------------------------------------------------

def check_args(args, world_size: int) -> list[str]:
    """Every problem with the arguments that can be seen without loading the model, listed at once."""
    problems = []
    if args.method not in METHODS:
        problems.append(f"--method {args.method!r}: choose one of {', '.join(METHODS)}")
    if args.train_data not in ("gsm8k", "metamathqa"):
        problems.append(f"--train_data {args.train_data!r}: choose gsm8k or metamathqa")
    if args.init_rule not in ("adamw", "sgd"):
        problems.append(f"--init_rule {args.init_rule!r}: choose adamw or sgd")
    if args.init_svd not in ("exact", "randomized"):
        problems.append(f"--init_svd {args.init_svd!r}: choose exact or randomized")
    if args.init_accumulate_on not in ("device", "cpu"):
        problems.append(f"--init_accumulate_on {args.init_accumulate_on!r}: choose device or cpu")
    if args.dtype not in (None, "bfloat16", "float32"):
        problems.append(f"--dtype {args.dtype!r}: choose bfloat16 or float32")
    if args.method in DEFAULT_RANK and (args.rank is None or args.rank < 1):
        problems.append(f"--rank must be a positive integer, got {args.rank}")
    positive = ["epochs", "batch_size", "micro_batch_size", "max_length", "eval_batch_size", "max_new_tokens",
                "save_every", "log_every"]
    problems += [f"--{name} must be positive, got {getattr(args, name)}" for name in positive
                 if getattr(args, name) < 1]
    problems += [f"--{name} must be positive, got {getattr(args, name)}"
                 for name in ("max_steps", "eval_limit", "num_train", "num_init_samples")
                 if getattr(args, name) is not None and getattr(args, name) < 1]
    if args.lr <= 0 or not 0 <= args.warmup_ratio < 1 or args.weight_decay < 0 or args.grad_clip < 0:
        problems.append("need --lr > 0, 0 <= --warmup_ratio < 1, --weight_decay >= 0 and --grad_clip >= 0")
    if args.micro_batch_size >= 1 and args.batch_size % (args.micro_batch_size * world_size):
        problems.append(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                        f"{args.micro_batch_size} x {world_size} GPU(s): gradient accumulation needs a whole number")
    if args.adapter and not args.eval_only:
        problems.append("--adapter is for --eval_only (training writes its own adapter)")
    if args.adapter and not Path(args.adapter).is_file():
        problems.append(f"--adapter {args.adapter}: no such file")
    if args.adapter and args.method == "full":
        problems.append("--adapter with --method full: pass the fine-tuned model folder as --model instead")
    if args.data_dir and not all((Path(args.data_dir) / f"{s}.jsonl").is_file() for s in ("train", "test")):
        problems.append(f"--data_dir {args.data_dir}: needs train.jsonl and test.jsonl (GSM8K)")
    if args.metamathqa_path and not Path(args.metamathqa_path).is_file():
        problems.append(f"--metamathqa_path {args.metamathqa_path}: no such file")
    if args.num_init_samples is not None and args.num_init_samples < world_size:
        problems.append(f"--num_init_samples {args.num_init_samples} is fewer than the {world_size} processes: "
                        "every rank needs at least one example for the estimate")
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite contradict each other: choose one")
    if args.resume and args.eval_only:
        problems.append("--resume is for training, not --eval_only")
    out = Path(args.out_dir)
    if args.resume and not (out / "checkpoints" / "latest").is_file():
        problems.append(f"--resume: no checkpoint in {out} (expected {out / 'checkpoints' / 'latest'})")
    if not args.resume and not args.overwrite and out.is_dir() and any(out.iterdir()):
        problems.append(f"--out_dir {out} exists and is not empty: pass --resume to continue it, --overwrite to "
                        f"start over, or choose another --out_dir")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        problems.append(f"--out_dir {out}: {parent} is not writable")
    return problems


def check_model(args, config: model_lib.ModelConfig) -> list[str]:
    """Problems that need the model's shapes (read from config.json alone, before any weight is loaded)."""
    if args.method == "full":
        return []
    skeleton = model_lib.build_model(config, device="meta")
    try:
        targets = lorasb.find_targets(skeleton, args.targets)
    except ValueError as e:
        return [f"--targets: {e}"]
    return [f"--rank {args.rank} is too large for {name} ({m.out_features} x {m.in_features}): at most "
            f"{min(m.out_features, m.in_features)}" for name, m in targets.items()
            if args.rank > min(m.out_features, m.in_features)][:3]


def refuse(problems: list[str]) -> None:
    sys.exit("Cannot start:\n" + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------------------------------------------------------------
# Data, loss and schedule.
# ---------------------------------------------------------------------------------------------------------------------

def gsm8k_dir(data_dir: str | None) -> Path:
    """GSM8K's folder: --data_dir, or the cache, into which the official files are downloaded (sha256-checked) once.
    LORASB_GSM8K_URL replaces their base URL (a mirror, or a test server)."""
    if data_dir:
        return Path(data_dir)
    base = os.environ.get("LORASB_GSM8K_URL", data.GSM8K_URL).rstrip("/")
    for split, sha256 in data.GSM8K_SHA256.items():
        model_lib.cached_download(f"{base}/{split}.jsonl", f"gsm8k/{split}.jsonl", sha256, "--data_dir")
    return model_lib.CACHE_DIR / "gsm8k"


def metamathqa_file(path: str | None) -> Path:
    """--metamathqa_path, or MetaMathQA-395K.json (~400 MB) from the hub (HF_ENDPOINT or huggingface.co), downloaded
    into the cache once. No checksum is published for it, so it is not verified."""
    if path:
        return Path(path)
    endpoint = os.environ.get("HF_ENDPOINT", model_lib.HUB_ENDPOINT).rstrip("/")
    return model_lib.cached_download(f"{endpoint}/{data.METAMATHQA_FILE}", "metamathqa/MetaMathQA-395K.json",
                                     local_option="--metamathqa_path")


def training_pairs(args) -> list[tuple[str, str]]:
    """(prompt, response) pairs in the authors' format: their Alpaca prompt, the response, then EOS."""
    if args.train_data == "gsm8k":
        rows = data.load_gsm8k("train", gsm8k_dir(args.data_dir))[:args.num_train]
        return [(data.TRAIN_PROMPT.format(instruction=r["question"]), data.gsm8k_response(r["answer"])) for r in rows]
    rows = data.load_metamathqa(args.num_train or 50_000, metamathqa_file(args.metamathqa_path))
    return [(data.TRAIN_PROMPT.format(instruction=r["query"]), r["response"]) for r in rows]


def causal_lm_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction over the labelled (response) tokens of a batch, in fp32: their mean,
    or with reduction="sum" their sum."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction=reduction)


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """LR of optimizer step `step` (1-based): linear warmup peak * step / warmup_steps, then cosine decay towards 0.

    Step 1 gets peak / warmup_steps, not 0 (HF's warmup starts at 0), so lr_1, the LR that LoRA-SB's first-step
    estimate assumes, is the LR the first step really uses."""
    if step <= warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps + 1)  # the last step's LR is small, not 0
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temp folder, renamed into place, then pointed to by checkpoints/latest (written atomically),
# so a kill at any moment leaves the previous checkpoint intact.
# ---------------------------------------------------------------------------------------------------------------------

def save_trainable(model, path: Path, method: str, base_model: str) -> None:
    """The adapter (safetensors + metadata), or for full fine-tuning every weight under its Hugging Face name."""
    if method == "full":
        lorasb.save_safetensors(path, model.state_dict())
    else:
        lorasb.save_adapter(model, path, method, base_model)


def rng_states(device: torch.device) -> dict:
    """Every RNG the run could draw from (on CUDA, this rank's device only), in types torch.load(weights_only=True)
    accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(states: dict, device: torch.device) -> None:
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def save_checkpoint(out: Path, step: int, model, optimizer, batches, args, device) -> None:
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = folder / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_trainable(model, tmp / "trainable.safetensors", args.method, args.model)
    state = {"step": step, "optimizer": optimizer.state_dict(), "data": batches.state_dict(), "rng": rng_states(device),
             "args": vars(args)}
    lorasb.atomic_write(tmp / "state.pt", lambda f: torch.save(state, f))
    shutil.rmtree(folder / name, ignore_errors=True)
    os.replace(tmp, folder / name)
    lorasb.atomic_write(folder / "latest", lambda f: f.write(name.encode()))
    for old in folder.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old)


def latest_checkpoint(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


# Settings a resumed run must share with the run it continues (the rest, e.g. --eval_limit, may change).
RESUME_KEYS = ("model", "method", "rank", "lora_alpha", "targets", "train_data", "num_train", "epochs", "max_steps",
               "lr", "warmup_ratio", "weight_decay", "grad_clip", "batch_size", "micro_batch_size", "max_length",
               "seed")


def check_resume(saved: dict, args) -> None:
    current = vars(args)
    changed = [f"--{k}: {saved.get(k)!r} -> {current[k]!r}" for k in RESUME_KEYS
               if json.dumps(saved.get(k)) != json.dumps(current[k])]
    if changed:
        refuse([f"--resume with settings that differ from the checkpoint's: {', '.join(changed)}"])


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: adapters merged, batched greedy decoding with a KV cache, the authors' prompt, stop strings and scoring.
# ---------------------------------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, questions: list[dict], args, eos_ids: set[int], rank: int, world_size: int) -> list[dict]:
    """Greedy completions of this rank's share of the questions, scored by the authors' rules."""
    mine = list(range(rank, len(questions), world_size))
    prompts = [tokenizer.encode(data.eval_prompt(questions[i]["question"])) for i in mine]
    # Stop strings are matched on the generated text only (the prompt contains "Instruction:" and "Response:");
    # the last few tokens suffice to see a new one, so each check decodes a short tail.
    stop = lambda new: any(s in tokenizer.decode(new[-8:]) for s in data.STOP_STRINGS)  # noqa: E731
    # generate sorts the prompts by length into batches (less padding) and shows a progress bar over them
    outputs = model_lib.generate(model, prompts, args.max_new_tokens, eos_ids, tokenizer.pad_id, stop=stop,
                                 batch_size=args.eval_batch_size)
    completions = [data.cut_at_stop(tokenizer.decode(new, skip_special_tokens=True))[0] for new in outputs]
    rows = []
    for i, completion in zip(mine, completions):
        gold = data.gold_answer(questions[i]["answer"])
        extracted = data.extract_answer(completion)
        rows.append({"index": i, "question": questions[i]["question"], "completion": completion,
                     "extracted": extracted, "gold": gold, "correct": data.is_correct(extracted, gold)})
    return rows


def held_out_loss(model, tokenizer, questions: list[dict], args, device, rank: int, world_size: int) -> float:
    """Mean next-token loss per response token of the reference solutions, in the training format (teacher forcing):
    a smoother measure than accuracy for comparing methods on the same budget."""
    pairs = [(data.TRAIN_PROMPT.format(instruction=q["question"]), data.gsm8k_response(q["answer"]))
             for q in questions[rank::world_size]]
    examples, _ = data.tokenize_dataset(tokenizer, pairs, args.max_length)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * tokens, tokens)
    for start in range(0, len(examples), args.micro_batch_size):
        batch = to_device(data.collate(examples[start:start + args.micro_batch_size], tokenizer.pad_id), device)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        sums += torch.stack([causal_lm_loss(model, batch, reduction="sum").double(), tokens.double()])
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    lorasb.atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def write_json(path: Path, obj) -> None:
    lorasb.atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    distributed = int(os.environ.get("RANK", -1)) != -1
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    problems = check_args(args, world_size)
    if problems:
        refuse(problems)

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per rank
    if distributed:  # gloo too on GPU: the estimate's sample count and CPU accumulators are CPU tensors
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    compute_dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    # Frozen weights can be stored in bf16; weights that train are kept in fp32 (bf16 would round small updates away)
    # and run under bf16 autocast, like mixed-precision training elsewhere.
    weights_dtype = torch.float32 if args.method == "full" and not args.eval_only else compute_dtype
    main_process = rank == 0
    log = print if main_process else (lambda *a, **k: None)
    out = Path(args.out_dir)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    if distributed and rank != 0:
        dist.barrier()  # rank 0 downloads first; the others then find the files in the cache
    folder = model_lib.resolve_model(args.model)
    questions = data.load_gsm8k("test", gsm8k_dir(args.data_dir))[:args.eval_limit]
    pairs = None if args.eval_only else training_pairs(args)
    if distributed and rank == 0:
        dist.barrier()
    config = model_lib.load_config(folder)
    problems = [] if args.eval_only else check_model(args, config)
    if problems:
        refuse(problems)
    tokenizer = data.Tokenizer.from_dir(folder)
    eos_ids = {tokenizer.eos_id, *config.eos_token_ids} - {None}

    if main_process:
        if args.overwrite:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            for stale in ("metrics.jsonl", "predictions.jsonl", "summary.json"):
                (out / stale).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    model = model_lib.load_model(folder, device=device, dtype=weights_dtype)
    num_base = sum(p.numel() for p in model.parameters())
    lora32 = sum(32 * (m.out_features + m.in_features) for m in lorasb.find_targets(model, args.targets).values())
    num_trainable = 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if compute_dtype == torch.bfloat16 else nullcontext()
    init_seconds = train_seconds = 0.0

    if args.eval_only:
        if args.adapter:
            info = lorasb.load_adapter(model, args.adapter)
            args.method, args.rank = info["method"], info["rank"]  # the summary describes what was evaluated
            log(f"loaded {info['method']} adapter (rank {info['rank']}) from {args.adapter}")
        else:
            args.method, args.rank = "base", None
    else:
        examples, num_truncated = data.tokenize_dataset(tokenizer, pairs, args.max_length)
        log(f"training examples: {len(examples)} ({num_truncated} truncated to {args.max_length} tokens)")
        grad_accum = args.batch_size // (args.micro_batch_size * world_size)
        batches = data.Batches(examples, args.micro_batch_size, args.seed, rank=rank, world_size=world_size,
                               pad_id=tokenizer.pad_id)
        steps_per_epoch = len(batches) // grad_accum
        total_steps = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
        if total_steps < 1:
            refuse([f"{len(examples)} examples make no full optimizer step of {args.batch_size}: lower --batch_size"])
        warmup_steps = math.ceil(args.warmup_ratio * total_steps)
        lr_1 = learning_rate(1, args.lr, warmup_steps, total_steps)
        start_step, resume_state = 0, None
        if args.resume:
            checkpoint = latest_checkpoint(out)
            resume_state = torch.load(checkpoint / "state.pt", weights_only=True, map_location="cpu")
            check_resume(resume_state["args"], args)
            start_step = resume_state["step"]

        t0, report = time.time(), None
        if args.method == "full":
            if resume_state:
                model.load_state_dict(lorasb.load_safetensors(checkpoint / "trainable.safetensors")[0])
        elif resume_state:  # B and A come from sampled data and an SVD: reload them, never re-estimate
            lorasb.load_adapter(model, checkpoint / "trainable.safetensors")
        elif args.method == "lorasb":
            # lr_1 is the LR of this schedule's first optimizer step. The authors' code divided the LR by the warmup
            # length of their small estimation loader (batch 3), not of the optimizer steps: ~10x too small an lr_1.
            num_init = args.num_init_samples or max(32, round(0.001 * len(examples)))
            local_init = num_init // world_size + (rank < num_init % world_size)
            init_batches = data.Batches(examples, args.micro_batch_size, args.seed + 1, rank=rank,
                                        world_size=world_size, pad_id=tokenizer.pad_id)
            log(f"estimating the first update from {num_init} examples (lr_1 = {lr_1:.3g}, rule {args.init_rule})")

            bar = tqdm(desc="estimating", total=local_init, unit="example", disable=not main_process)

            def init_loss(m, batch):
                bar.update(len(batch["input_ids"]))
                with autocast:
                    return causal_lm_loss(m, to_device(batch, device))

            updates = lorasb.estimate_first_update(
                model, init_batches, init_loss, local_init, lr_1, args.targets, rule=args.init_rule,
                accumulate_on="cpu" if args.init_accumulate_on == "cpu" else None)
            bar.close()
            report = lorasb.add_adapters(model, "lorasb", args.rank, args.targets, updates=updates,
                                         randomized_svd=args.init_svd == "randomized")
            del updates
        else:
            report = lorasb.add_adapters(model, args.method, args.rank, args.targets, lora_alpha=args.lora_alpha,
                                         seed=args.seed, randomized_svd=args.init_svd == "randomized")
        init_seconds = time.time() - t0

        trainable = [p for p in model.parameters() if p.requires_grad]
        num_trainable = sum(p.numel() for p in trainable)
        if report:
            log(report)
        versus_lora = (f"1/{lora32 / num_trainable:.1f} of" if num_trainable <= lora32
                       else f"{num_trainable / lora32:.1f}x")
        log(f"trainable parameters: {num_trainable:,} = {versus_lora} LoRA r=32 ({lora32:,}) = "
            f"{100 * num_trainable / num_base:.4f}% of full fine-tuning ({num_base:,})")

        optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                      weight_decay=args.weight_decay, fused=device.type == "cuda")
        if resume_state:
            optimizer.load_state_dict(resume_state["optimizer"])
            batches.load_state_dict(resume_state["data"])
            set_rng_states(resume_state["rng"], device)
            log(f"resumed from {checkpoint} at step {start_step}")
        run_model = torch.compile(model) if args.compile else model
        if distributed:  # B and A are identical on every rank by construction: no need to broadcast buffers
            run_model = DistributedDataParallel(run_model, device_ids=[device.index] if device.type == "cuda" else None,
                                                broadcast_buffers=False)
        if main_process:
            write_json(out / "config.json", {**vars(args), "grad_accum": grad_accum, "total_steps": total_steps,
                                             "warmup_steps": warmup_steps, "lr_1": lr_1, "world_size": world_size,
                                             "trainable_parameters": num_trainable, "model_config": vars(config),
                                             "torch": torch.__version__})
            metrics_path = out / "metrics.jsonl"
            kept = [line for line in (metrics_path.read_text().splitlines() if metrics_path.exists() else [])
                    if json.loads(line)["step"] <= start_step]  # a resumed run rewrites what came after its checkpoint
            lorasb.atomic_write(metrics_path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))

        log(f"training: {total_steps} steps of {args.batch_size} examples ({grad_accum} x {args.micro_batch_size} x "
            f"{world_size}), lr {args.lr:g} (warmup {warmup_steps}, cosine), weight decay {args.weight_decay:g}")
        t0, tokens, last_log = time.time(), 0, time.time()
        run_model.train()
        bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, desc="training",
                   disable=not main_process)
        for step in bar:
            lr = learning_rate(step + 1, args.lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(grad_accum):
                batch = batches.next_batch()
                tokens += int(batch["attention_mask"].sum()) * world_size
                batch = to_device(batch, device)
                sync = micro == grad_accum - 1  # DDP all-reduces gradients on the last micro-step only
                with (run_model.no_sync() if distributed and not sync else nullcontext()), autocast:
                    loss = causal_lm_loss(run_model, batch) / grad_accum
                loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if done % args.log_every == 0 or done == total_steps:
                if distributed:
                    dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
                now = time.time()
                row = {"step": done, "loss": loss_sum.item(), "lr": lr, "grad_norm": grad_norm.item(),
                       "tokens_per_s": tokens / (now - last_log), "elapsed_s": now - t0}
                tokens, last_log = 0, now
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                if main_process:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
            if done % args.save_every == 0 or done == total_steps:
                if main_process:
                    save_checkpoint(out, done, model, optimizer, batches, args, device)
                if distributed:
                    dist.barrier()
        train_seconds = time.time() - t0
        if main_process and args.method == "full":  # a model folder that --model (and transformers) can load
            (out / "model").mkdir(exist_ok=True)
            save_trainable(model, out / "model" / "model.safetensors", args.method, args.model)
            for name in MODEL_FOLDER_FILES:
                if (folder / name).is_file():
                    shutil.copy(folder / name, out / "model" / name)
        elif main_process:
            save_trainable(model, out / "adapter.safetensors", args.method, args.model)
            lorasb.export_peft(model, out / "peft_adapter", base_model=args.model)

    model.eval()
    if weights_dtype == torch.float32:
        lorasb.merge_adapters(model)  # evaluation runs at the base model's cost
    # In bf16, W0 + B R A would round the small trained delta away (bf16 keeps ~3 digits of W0): run unmerged then,
    # at the cost of three thin matmuls per layer.
    with torch.no_grad(), autocast:
        test_loss = held_out_loss(model, tokenizer, questions, args, device, rank, world_size)
        rows = evaluate(model, tokenizer, questions, args, eos_ids, rank, world_size)
    if distributed:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    result = data.score([r["completion"] for r in rows], [r["gold"] for r in rows])
    summary = {"accuracy": result["accuracy"], "correct": result["correct"], "invalid": result["invalid"],
               "total": result["total"], "test_loss": test_loss, "method": args.method, "rank": args.rank, "model": args.model,
               "trainable_parameters": num_trainable,
               "init_seconds": init_seconds, "train_seconds": train_seconds,
               "peak_memory_bytes": peak_memory_bytes(device)}
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "predictions.jsonl", rows)
        write_json(out / "summary.json", summary)
        print_summary(summary, out)
    if distributed:
        dist.destroy_process_group()
    return summary


def print_summary(summary: dict, out: Path) -> None:
    print(f"\n{'=' * 72}\nGSM8K test: {summary['accuracy']:.2%} ({summary['correct']}/{summary['total']}, "
          f"{summary['invalid']} without an answer), loss {summary['test_loss']:.4f}  "
          f"[{summary['method']}, rank {summary['rank']}, {summary['model']}]\n"
          f"trainable parameters {summary['trainable_parameters']:,} | init {summary['init_seconds']:.1f} s | "
          f"training {summary['train_seconds']:.1f} s | peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB\n"
          f"outputs in {out}/ (summary.json, predictions.jsonl, metrics.jsonl, adapter)\n{'=' * 72}")


if __name__ == "__main__":
    main()
