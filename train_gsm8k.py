r"""Fine-tune a pretrained LLM on GSM8K with LoRA-SB (or LoRA, LoRA-XS, full fine-tuning) and evaluate it on GSM8K (and
MATH).

One GPU (Qwen/Qwen2.5-0.5B, LoRA-SB rank 96 on the seven projections, GSM8K train, then GSM8K test accuracy):
    python train_gsm8k.py
A baseline is one flag away:
    python train_gsm8k.py --method lora      # or loraxs, full
Several GPUs (the first-update estimate is summed over processes, data is sharded, process 0 writes):
    torchrun --nproc_per_node=8 train_gsm8k.py
Quick check on CPU with a local model folder and the GSM8K files:
    python train_gsm8k.py --model path/to/model --data_dir path/to/gsm8k --device cpu --max_steps 5 --eval_limit 8
The paper's arithmetic setting (Mistral-7B, MetaMathQA first 50K, rank 96, 1 epoch), evaluated on GSM8K and MATH:
    python train_gsm8k.py --model mistralai/Mistral-7B-v0.1 --train_data metamathqa --num_train 50000 \
        --rank 96 --epochs 1 --weight_decay 0.01 --eval_data gsm8k,math
The authors' exact run adds their lr_1, SVD, init batches and evaluated model (README.md, "The authors' exact run"):
        --num_init_samples 50 --init_batch_size 3 --lr_1 2.99994e-7 --init_svd authors --eval_merge bf16

A run, in the order main() calls its phases:
    setup                   check every argument, start torch.distributed, pick the device and dtypes, seed
    load                    the model folder and config, the tokenizer, the test problems, the training pairs
    plan_training           steps, warmup, lr_1 (the first step's LR, or --lr_1) and the number of init samples
    initialize_adapters     the method: LoRA-SB estimates the first full fine-tuning update, then B, R, A = its SVD
    train                   AdamW on what trains, gradient accumulation, checkpoints every --save_every steps
    save_outputs            the adapter and its PEFT export (or the fine-tuned model folder)
    report                  evaluate (held-out loss, greedy answers to GSM8K and MATH scored by the authors' rules),
                            write summary.json
"""

import argparse
import atexit
import errno
import gc
import hashlib
import inspect
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
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

METHODS = (*lorasb.METHODS, "full")  # the adapters of lorasb.py, and full fine-tuning
EVAL_SETS = {"gsm8k": "predictions.jsonl", "math": "predictions_math.jsonl"}  # test set -> file of its scored answers
DEFAULT_RANK = {"lorasb": 96, "loraxs": 96, "lora": 32}  # the paper's Table 1 ranks
MODEL_FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------------------------------
# Arguments: parsed once (defaults that depend on other arguments are resolved here), then never rewritten.
# ---------------------------------------------------------------------------------------------------------------------

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
    a("--init_svd", default="exact", help="exact or randomized SVD for the initialization, or authors (theirs: "
      "svd_lowrank with q = rank, 10 power iterations, seed 42; lorasb only)")
    a("--init_batch_size", type=int, default=None, help="examples per batch of the first-update estimate "
      "(default: --micro_batch_size; the authors' 3)")
    a("--lr_1", type=float, default=None, help="the step size of the first-update estimate, which sets the size of "
      "R at init (default: the LR of the first optimizer step; the authors' run used 1e-4 / 333.34 = 2.99994e-7)")
    a("--init_accumulate_on", default="device", help="where the fp32 gradient sums live: device or cpu")
    a("--eval_data", default="gsm8k", help="comma-separated test sets to answer: gsm8k (1319), math (5000)")
    a("--math_path", default=None, help="local MetaMath MATH_test.jsonl (default: download from MetaMath's repository)")
    a("--eval_limit", type=int, default=None, help="evaluate on the first N problems of each test set (default: all)")
    a("--eval_batch_size", type=int, default=64, help="prompts per generation batch")
    a("--max_new_tokens", type=int, default=256, help="generation budget per GSM8K question (the authors' 256)")
    a("--math_max_new_tokens", type=int, default=512, help="generation budget per MATH problem (the authors' 512)")
    a("--eval_merge", default="exact", help="exact (the adapter as trained: merged in fp32, unmerged with bf16 "
      "weights) or bf16 (the authors': merged, then every weight in bf16)")
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
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.init_batch_size is None:
        args.init_batch_size = args.micro_batch_size
    args.targets = tuple(t for t in args.targets.split(",") if t)
    args.eval_data = tuple(s for s in args.eval_data.split(",") if s)
    return args


def check_args(args, ddp_world_size: int) -> list[str]:
    """Every problem with the arguments that can be seen without loading the model, listed at once."""
    problems = []
    choices = {"method": METHODS, "train_data": ("gsm8k", "metamathqa"), "init_rule": ("adamw", "sgd"),
               "init_svd": ("exact", "randomized", "authors"), "init_accumulate_on": ("device", "cpu"),
               "dtype": (None, "bfloat16", "float32"), "eval_merge": ("exact", "bf16")}
    problems += [f"--{name} {getattr(args, name)!r}: choose one of {', '.join(c for c in allowed if c)}"
                 for name, allowed in choices.items() if getattr(args, name) not in allowed]
    if args.method in DEFAULT_RANK and (args.rank is None or args.rank < 1):
        problems.append(f"--rank must be a positive integer, got {args.rank}")
    positive = ["epochs", "batch_size", "micro_batch_size", "max_length", "eval_batch_size", "max_new_tokens",
                "save_every", "log_every", "math_max_new_tokens", "init_batch_size"]
    problems += [f"--{name} must be positive, got {getattr(args, name)}" for name in positive
                 if getattr(args, name) < 1]
    problems += [f"--{name} must be positive, got {getattr(args, name)}"
                 for name in ("max_steps", "eval_limit", "num_train", "num_init_samples")
                 if getattr(args, name) is not None and getattr(args, name) < 1]
    problems += [f"--{name} must be a finite number, got {getattr(args, name)}"
                 for name in ("lr", "lr_1", "warmup_ratio", "weight_decay", "grad_clip", "lora_alpha")
                 if getattr(args, name) is not None and not math.isfinite(getattr(args, name))]
    if args.lr <= 0 or not 0 <= args.warmup_ratio < 1 or args.weight_decay < 0 or args.grad_clip < 0:
        problems.append("need --lr > 0, 0 <= --warmup_ratio < 1, --weight_decay >= 0 and --grad_clip >= 0")
    if args.lr_1 is not None and args.lr_1 <= 0:
        problems.append(f"--lr_1 must be positive, got {args.lr_1}")
    if args.init_svd == "authors" and args.method != "lorasb":
        problems.append(f"--init_svd authors is LoRA-SB's initialization; --method {args.method} does not use it")
    unknown = [s for s in args.eval_data if s not in EVAL_SETS]
    if unknown or not args.eval_data:
        problems.append(f"--eval_data {','.join(args.eval_data)!r}: choose test sets among {', '.join(EVAL_SETS)}, "
                        "comma-separated")
    if args.micro_batch_size >= 1 and args.batch_size % (args.micro_batch_size * ddp_world_size):
        problems.append(f"--batch_size {args.batch_size} is not a multiple of --micro_batch_size "
                        f"{args.micro_batch_size} x {ddp_world_size} GPU(s): gradient accumulation needs a whole "
                        "number")
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
    if args.math_path and not Path(args.math_path).is_file():
        problems.append(f"--math_path {args.math_path}: no such file")
    if args.num_init_samples is not None and args.num_init_samples < ddp_world_size:
        problems.append(f"--num_init_samples {args.num_init_samples} is fewer than the {ddp_world_size} processes: "
                        "every process needs at least one example for the estimate")
    return problems + check_out_dir(args)


def check_out_dir(args) -> list[str]:
    """--out_dir must be writable, and must not silently mix two runs (--resume continues, --overwrite starts over)."""
    problems = []
    if args.resume and args.overwrite:
        problems.append("--resume and --overwrite contradict each other: choose one")
    if args.resume and args.eval_only:
        problems.append("--resume is for training, not --eval_only")
    out = Path(args.out_dir)
    if args.resume and not any((out / "checkpoints").glob("step-*")):
        problems.append(f"--resume: no checkpoint in {out / 'checkpoints'}; to start over, run without --resume "
                        f"(adding --overwrite if {out} is not empty)")
    if not args.resume and not args.overwrite and out.is_dir() and any(out.iterdir()):
        problems.append(f"--out_dir {out} exists and is not empty: pass --resume to continue it, --overwrite to "
                        f"start over, or choose another --out_dir")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        problems.append(f"--out_dir {out}: {parent} is a file, not a folder")
    elif not os.access(parent, os.W_OK):
        problems.append(f"--out_dir {out}: {parent} is not writable")
    return problems


def check_model(args, config: model_lib.ModelConfig) -> list[str]:
    """Problems that need the model's shapes (read from config.json alone, before any weight is loaded)."""
    if args.method == "full" or args.eval_only:
        return []
    try:
        targets = lorasb.find_targets(model_lib.build_model(config), args.targets)
    except ValueError as e:
        return [f"--targets: {e}"]
    return [f"--{problem}" for problem in lorasb.rank_problems(targets, args.rank)][:3]


def refuse(problems: list[str]) -> None:
    """Exit with the problems listed; under torchrun every process finds them, process 0 prints them."""
    sys.exit("Cannot start:\n" + "\n".join(f"  - {p}" for p in problems) if os.environ.get("RANK", "0") == "0" else 1)


# ---------------------------------------------------------------------------------------------------------------------
# Setup: one process, or one of torchrun's (ddp_rank of ddp_world_size); device, dtypes, seeds.
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """Where and how this process runs, derived once from the arguments and the torchrun environment."""
    ddp: bool
    ddp_rank: int
    ddp_world_size: int
    device: torch.device
    compute_dtype: torch.dtype  # the dtype of the forward pass: bf16 on GPU, fp32 on CPU
    weights_dtype: torch.dtype  # frozen weights are stored in compute_dtype; weights that train stay fp32

    @property
    def master_process(self) -> bool:
        return self.ddp_rank == 0

    def autocast(self):
        """bf16 autocast when computing in bf16 (mixed precision for the fp32 weights that train), else nothing."""
        if self.compute_dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def log(self, *message) -> None:
        if self.master_process:
            print(*message, flush=True)

    def warn(self, message: str) -> None:
        if self.master_process:
            warnings.warn(message, stacklevel=2)

    def my_share(self, n: int) -> list[int]:
        """The indices of n items that this process handles: every ddp_world_size-th one from ddp_rank."""
        return list(range(self.ddp_rank, n, self.ddp_world_size))


def setup(args) -> Setup:
    """Refuse bad arguments (all listed at once), then start torch.distributed under torchrun, pick the device and the
    dtypes, and seed every RNG."""
    ddp = "RANK" in os.environ
    ddp_rank, ddp_world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    problems = check_args(args, ddp_world_size)
    if problems:
        refuse(problems)
    device = torch.device(args.device)
    if ddp and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
    if ddp:  # gloo too on GPU: the estimate's sample count and CPU accumulators are CPU tensors
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave_process_group)  # also when the run stops early, with sys.exit
    if device.type == "cuda":
        torch.cuda.set_device(device)
    compute_dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    # Frozen weights can be stored in bf16; weights that train are kept in fp32 (bf16 would round small updates away)
    # and run under bf16 autocast, like mixed-precision training elsewhere.
    weights_dtype = torch.float32 if args.method == "full" and not args.eval_only else compute_dtype
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    return Setup(ddp, ddp_rank, ddp_world_size, device, compute_dtype, weights_dtype)


def leave_process_group() -> None:
    """Destroy torch.distributed's process group, after freeing what may still hold its collective work (train's DDP
    wrapper keeps its last all-reduce, and a reference cycle can keep an object alive until a collection): a work
    object or gloo thread destroyed during interpreter shutdown instead aborts the process with "terminate called
    without an active exception"."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Load: the model folder, the tokenizer and the data (downloaded into the cache when not given as local files).
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


def math_file(path: str | None) -> Path:
    """--math_path, or MetaMath's MATH_test.jsonl (~6 MB) downloaded into the cache once. LORASB_MATH_URL replaces its
    URL (a mirror, or a test server). No checksum is pinned (see data.MATH_URL); data.load_math checks every record."""
    if path:
        return Path(path)
    url = os.environ.get("LORASB_MATH_URL", data.MATH_URL)
    return model_lib.cached_download(url, "math/MATH_test.jsonl", local_option="--math_path")


def training_pairs(args) -> list[tuple[str, str]]:
    """(prompt, response) pairs in the authors' format: their Alpaca prompt, the response, then EOS."""
    if args.train_data == "gsm8k":
        rows = data.load_gsm8k("train", gsm8k_dir(args.data_dir))[:args.num_train]
        return [(data.TRAIN_PROMPT.format(instruction=r["question"]), data.gsm8k_response(r["answer"])) for r in rows]
    rows = data.load_metamathqa(args.num_train or 50_000, metamathqa_file(args.metamathqa_path))
    return [(data.TRAIN_PROMPT.format(instruction=r["query"]), r["response"]) for r in rows]


@dataclass
class Loaded:
    """What the run reads before the weights: the model folder and config, the tokenizer, and the data."""
    folder: Path
    config: model_lib.ModelConfig
    tokenizer: data.Tokenizer
    questions: list[dict]  # the GSM8K test questions (their held-out loss is always measured)
    pairs: list[tuple[str, str]] | None  # the (prompt, response) training pairs; None with --eval_only
    math_problems: list[dict] | None = None  # the MATH test problems, with --eval_data math

    @property
    def eos_ids(self) -> set[int]:
        """Generation stops at any of these: the tokenizer's EOS and the config's (often a longer list)."""
        return {self.tokenizer.eos_id, *self.config.eos_token_ids} - {None}


def load(args, env: Setup) -> Loaded:
    """Resolve the model folder (local, HF cache or download) and the data, read config.json and check what depends on
    the model's shapes, then load the tokenizer. Under torchrun process 0 downloads first; the others then find the
    files in the cache."""
    if env.ddp and not env.master_process:
        dist.barrier()
    folder = model_lib.resolve_model(args.model)
    questions = data.load_gsm8k("test", gsm8k_dir(args.data_dir))[:args.eval_limit]
    pairs = None if args.eval_only else training_pairs(args)
    math_problems = data.load_math(math_file(args.math_path))[:args.eval_limit] if "math" in args.eval_data else None
    if env.ddp and env.master_process:
        dist.barrier()
    config = model_lib.load_config(folder)
    problems = check_model(args, config)
    if not questions:
        problems.append(f"{gsm8k_dir(args.data_dir) / 'test.jsonl'} holds no test question: evaluation needs one")
    if problems:
        refuse(problems)
    return Loaded(folder, config, data.Tokenizer.from_dir(folder), questions, pairs, math_problems)


def canonical_model(model: str) -> str:
    """A --model as it compares: a local folder as its resolved path ("x/" and "./x" are one), a hub name as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def training_examples(loaded: Loaded, args, env: Setup) -> list[dict]:
    """The training pairs tokenized (data.tokenize_dataset), less those that --max_length leaves without a response
    token: they would train nothing, and a micro-batch of only such examples has a loss of 0/0 = NaN."""
    examples, num_truncated = data.tokenize_dataset(loaded.tokenizer, loaded.pairs, args.max_length)
    kept = [e for e in examples if any(label != -100 for label in e["labels"][1:])]  # position 0 predicts nothing
    num_empty = len(examples) - len(kept)
    env.log(f"training examples: {len(kept)} ({num_truncated} truncated to {args.max_length} tokens, {num_empty} left "
            f"out: no response token left)")
    if not kept:
        refuse([f"--max_length {args.max_length} leaves no response token in any of the {len(examples)} training "
                f"examples (the prompt alone fills it): raise --max_length"])
    if num_empty:
        env.warn(f"{num_empty} of {len(examples)} training examples are left out: --max_length {args.max_length} "
                 f"cuts off their whole response (raise --max_length to train on them)")
    return kept


# ---------------------------------------------------------------------------------------------------------------------
# The schedule: the number of steps, the LR of each, and what the LoRA-SB initialization derives from it.
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """What the arguments and the data imply for training (recorded in config.json)."""
    grad_accum: int  # micro-batches per optimizer step on each process
    total_steps: int
    warmup_steps: int
    lr_1: float  # the step size of LoRA-SB's first-update estimate: the LR of the first optimizer step, or --lr_1
    num_init_samples: int | None  # examples of the LoRA-SB estimate (None for the other methods)


def learning_rate(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """LR of optimizer step `step` (1-based): linear warmup peak * step / warmup_steps, then cosine decay towards 0.

    Step 1 gets peak / warmup_steps, not 0 (HF's warmup starts at 0), so lr_1, the LR that LoRA-SB's first-step
    estimate assumes, is the LR the first step really uses."""
    if step <= warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps + 1)  # the last step's LR is small, not 0
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def plan_training(args, num_examples: int, ddp_world_size: int) -> Plan:
    grad_accum = args.batch_size // (args.micro_batch_size * ddp_world_size)
    micro_batches = math.ceil(num_examples / args.micro_batch_size) // ddp_world_size  # per process, as data.Batches
    total_steps = min(args.epochs * (micro_batches // grad_accum), args.max_steps or math.inf)
    if total_steps < 1:
        refuse([f"{num_examples} examples make no full optimizer step of {args.batch_size}: lower --batch_size"])
    warmup_steps = math.ceil(args.warmup_ratio * total_steps)
    # lr_1 is the LR of this schedule's first optimizer step. The authors' code divided the LR by the warmup length of
    # their small estimation loader (batch 3), not of the optimizer steps: ~10x too small an lr_1. --lr_1 sets it, to
    # reproduce theirs or to study the size of the initialization.
    lr_1 = args.lr_1 if args.lr_1 is not None else learning_rate(1, args.lr, warmup_steps, total_steps)
    num_init = args.num_init_samples or max(32, round(0.001 * num_examples)) if args.method == "lorasb" else None
    most = max_init_samples(num_examples, args.init_batch_size, ddp_world_size)
    if num_init is not None and num_init > most:
        refuse([f"{'--num_init_samples' if args.num_init_samples else 'the default number of init samples'} "
                f"{num_init}: the first-update estimate can use at most {most} of the {num_examples} training "
                f"examples ({ddp_world_size} process(es), batches of --init_batch_size {args.init_batch_size}); pass "
                f"--num_init_samples {most} or fewer"])
    return Plan(grad_accum, total_steps, warmup_steps, lr_1, num_init)


def max_init_samples(num_examples: int, batch_size: int, world_size: int) -> int:
    """The most examples the LoRA-SB estimate can take: process r reads its share (samples r, r + world_size, ...)
    from its own batches of one epoch, as data.Batches deals them: batches of batch_size (the last one short) dealt
    round-robin, the leftover batches dropped. The last process holds the short batch when none is dropped."""
    num_batches = math.ceil(num_examples / batch_size)
    capacity = num_batches // world_size * batch_size  # every process but maybe the last
    short = num_batches * batch_size - num_examples if num_batches % world_size == 0 else 0
    return min(world_size * capacity, world_size * (capacity - short) + world_size - 1)


# ---------------------------------------------------------------------------------------------------------------------
# Initializing the adapters: the one place where the method enters the run.
# ---------------------------------------------------------------------------------------------------------------------

def causal_lm_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction over the labelled (response) tokens of a batch, in fp32: their mean,
    or with reduction="sum" their sum."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                           reduction=reduction)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def estimate_first_update(model, examples: list[dict], pad_id: int, args, plan: Plan,
                          env: Setup) -> dict[str, torch.Tensor]:
    """dW = -lr_1 * sign(G) for every target weight, G summed over plan.num_init_samples training examples in an order
    of their own (seed + 1), in batches of --init_batch_size (the batching sets the weights of G's terms), split over
    the processes; see lorasb.estimate_first_update."""
    local_samples = len(env.my_share(plan.num_init_samples))
    init_batches = data.Batches(examples, args.init_batch_size, args.seed + 1, rank=env.ddp_rank,
                                world_size=env.ddp_world_size, pad_id=pad_id)
    env.log(f"estimating the first update from {plan.num_init_samples} examples (lr_1 = {plan.lr_1:.3g}, "
            f"rule {args.init_rule})")
    if args.lr_1 is None and plan.warmup_steps <= 1:
        env.warn(f"lr_1 = {plan.lr_1:.3g} is the peak learning rate: a schedule of {plan.total_steps} steps has "
                 f"{plan.warmup_steps} warmup step(s), so LoRA-SB starts from a full fine-tuning step of the adapter's "
                 f"peak learning rate on every weight (truncated to rank {args.rank}), a large jump that can hurt "
                 f"(README: 'lr_1 sets the size of the initialization'). More steps or a larger --warmup_ratio make "
                 f"lr_1 = --lr / warmup_steps a full fine-tuning step of sensible size.")
    bar = tqdm(desc="estimating", total=local_samples, unit="example", disable=not env.master_process)

    def loss_fn(m, batch):
        bar.update(len(batch["input_ids"]))
        with env.autocast():
            return causal_lm_loss(m, to_device(batch, env.device))

    updates = lorasb.estimate_first_update(model, init_batches, loss_fn, local_samples, plan.lr_1, args.targets,
                                           rule=args.init_rule,
                                           accumulate_on="cpu" if args.init_accumulate_on == "cpu" else None)
    bar.close()
    return updates


def initialize_adapters(model, examples: list[dict], pad_id: int, args, plan: Plan,
                        env: Setup) -> lorasb.AdapterReport | None:
    """Turn the pretrained model into what --method trains, freezing everything else:

        lorasb  estimate dW (above), then B, R, A = U_r, S_r, V_r^T of its SVD: the model starts at W0 + [dW]_r
        loraxs  B, A from the SVD of W0, R ~ N(0, 1e-5^2): the model starts at ~W0
        lora    B = 0, A Kaiming, scale alpha / r: the model starts at W0
        full    nothing to add: every weight trains
    """
    randomized = args.init_svd == "randomized"
    bar = lambda layers: tqdm(layers, desc="adding adapters", unit="layer", disable=not env.master_process)  # noqa: E731
    if args.method == "lorasb":
        updates = estimate_first_update(model, examples, pad_id, args, plan, env)
        return lorasb.add_adapters(model, "lorasb", args.rank, args.targets, updates=updates,
                                   randomized_svd=randomized, authors_svd=args.init_svd == "authors", progress=bar)
    if args.method in ("loraxs", "lora"):
        return lorasb.add_adapters(model, args.method, args.rank, args.targets, lora_alpha=args.lora_alpha,
                                   seed=args.seed, randomized_svd=randomized, progress=bar)
    return None


def parameter_counts(model, targets: tuple[str, ...]) -> dict[str, int]:
    """The sizes trainable parameter counts are compared with: the whole model (full fine-tuning) and LoRA r=32 on the
    targets. Count them before the adapters are added."""
    lora32 = sum(32 * (m.out_features + m.in_features) for m in lorasb.find_targets(model, targets).values())
    return {"full": sum(p.numel() for p in model.parameters()), "lora32": lora32}


def describe_trainable(model, reference_counts: dict[str, int], env: Setup) -> int:
    """Print the trainable parameter count beside LoRA r=32's and full fine-tuning's; return it."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora32, full = reference_counts["lora32"], reference_counts["full"]
    versus_lora = f"1/{lora32 / trainable:.1f} of" if trainable <= lora32 else f"{trainable / lora32:.1f}x"
    env.log(f"trainable parameters: {trainable:,} = {versus_lora} LoRA r=32 ({lora32:,}) = "
            f"{100 * trainable / full:.4f}% of full fine-tuning ({full:,})")
    return trainable


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints. checkpoints/ holds, once per run, run.json (what a resumed run must share with this one, and the sha256
# of initial_adapter.safetensors) and initial_adapter.safetensors (the adapter as initialized: B and A never change
# after it), then one folder per checkpoint: trainable.safetensors (what trains: R; B and A for LoRA; every weight for
# full fine-tuning), state.pt (optimizer, data position, RNG states) and manifest.json (the sha256 of both and of
# run.json, written last). A folder is written under a temporary name and renamed into place, then checkpoints/latest
# names it; the newest two are kept. --resume verifies the chain of hashes before the model loads, and falls back to
# the previous checkpoint when the latest is damaged.
# ---------------------------------------------------------------------------------------------------------------------

def save_trainable(model, path: Path, method: str, base_model: str) -> None:
    """The adapter (safetensors + metadata), or for full fine-tuning every weight under its Hugging Face name."""
    if method == "full":
        lorasb.save_safetensors(path, model.state_dict())
    else:
        lorasb.save_adapter(model, path, method, base_model)


def rng_states(device: torch.device) -> dict:
    """Every RNG the run could draw from (on CUDA, this process's device only), in types torch.load(weights_only=True)
    accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    return {"python": random.getstate(), "numpy": numpy_state,
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(states: dict, device: torch.device) -> None:
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


# Settings a resumed run must share with the run it continues (the rest, e.g. --eval_limit, may change).
RESUME_KEYS = ("model", "method", "rank", "lora_alpha", "targets", "train_data", "num_train", "epochs", "max_steps",
               "lr", "warmup_ratio", "weight_decay", "grad_clip", "batch_size", "micro_batch_size", "max_length",
               "seed", "num_init_samples", "init_rule", "init_svd", "init_batch_size", "lr_1")


def run_identity(args, loaded: Loaded, env: Setup) -> dict:
    """What a resumed run must share with the run it continues: the settings that shape it (a local --model as its
    resolved path), the number of processes, the dtype of the forward pass, and fingerprints of the training data file
    and of the model folder. Recorded in checkpoints/run.json."""
    settings = {**{key: getattr(args, key) for key in RESUME_KEYS}, "model": canonical_model(args.model)}
    data_file = gsm8k_dir(args.data_dir) / "train.jsonl" if args.train_data == "gsm8k" else metamathqa_file(
        args.metamathqa_path)
    return json.loads(strict_json({"settings": settings, "processes": env.ddp_world_size,
                                   "dtype": str(env.compute_dtype).removeprefix("torch."),
                                   "training data sha256": model_lib.sha256_file(data_file),
                                   "model fingerprint": model_fingerprint(loaded.folder)}))  # as it reads back


def model_fingerprint(folder: Path) -> str:
    """sha256 over a model folder's config.json and tokenizer.json, and over the name, the size and 16 spread blocks of
    64 KiB (the first holds the header) of each weight file: about 1 MiB read even of a 14 GB model, yet any other
    checkpoint of the same architecture (a fine-tune changes every block) gets another fingerprint."""
    h = hashlib.sha256()
    for path in [folder / "config.json", folder / "tokenizer.json", *sorted(folder.glob("*.safetensors"))]:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for offset in sorted({size * i // 16 for i in range(16)}):
                f.seek(offset)
                h.update(f.read(1 << 16))
    return h.hexdigest()


def start_checkpoints(out: Path, model, identity: dict, args, env: Setup) -> None:
    """Before the first step of a run (process 0): checkpoints/initial_adapter.safetensors, then run.json with its
    sha256, so that checkpoints store only what trains."""
    if not env.master_process:
        return
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    record = dict(identity)
    if args.method != "full":
        save_trainable(model, folder / "initial_adapter.safetensors", args.method, args.model)
        record["initial_adapter sha256"] = model_lib.sha256_file(folder / "initial_adapter.safetensors")
    write_json(folder / "run.json", record)


def save_checkpoint(out: Path, step: int, model, optimizer, batches: data.Batches, args, device) -> None:
    folder = out / "checkpoints"
    name = f"step-{step:07d}"
    tmp = folder / f".tmp-{name}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lorasb.save_safetensors(tmp / "trainable.safetensors",
                                {n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
        state = {"step": step, "optimizer": optimizer.state_dict(), "data": batches.state_dict(),
                 "rng": rng_states(device)}
        lorasb.atomic_write(tmp / "state.pt", lambda f: torch.save(state, f))
        hashes = {f"{name}/{file}": model_lib.sha256_file(tmp / file) for file in CHECKPOINT_FILES}
        write_json(tmp / "manifest.json", {"step": step, "sha256": {**hashes, "run.json": model_lib.sha256_file(
            folder / "run.json")}})
        shutil.rmtree(folder / name, ignore_errors=True)
        os.replace(tmp, folder / name)
        lorasb.atomic_write(folder / "latest", lambda f: f.write(name.encode()))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"Stopped at step {step}: its checkpoint could not be written to {folder}: "
                 f"{'the disk is full' if disk_is_full(e) else e} ({shutil.disk_usage(folder).free / 2**20:.0f} MiB "
                 f"free there). The previous checkpoints are intact: make room, then run again with --resume.")
    # Keep this one and the one before it (a fallback should this one be damaged later); drop older ones, and any
    # of a later step, left by a run that was resumed from an earlier checkpoint.
    kept = {name, *sorted(p.name for p in folder.glob("step-*") if p.name < name)[-1:]}
    for old in folder.glob("step-*"):
        if old.name not in kept:
            shutil.rmtree(old)


CHECKPOINT_FILES = ("trainable.safetensors", "state.pt")


def disk_is_full(e: BaseException | None) -> bool:
    """Whether ENOSPC (or a full quota) is anywhere in an exception's chain."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None: its manifest.json must list its files and run.json, each with
    the sha256 it has now."""
    try:
        listed = json.loads((folder / "manifest.json").read_text())["sha256"]
        expected = {f"{folder.name}/{file}" for file in CHECKPOINT_FILES} | {"run.json"}
        if not isinstance(listed, dict) or set(listed) != expected:
            return f"its manifest.json lists {sorted(listed)}, not {sorted(expected)}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable manifest.json ({type(e).__name__}: {e})"
    for file, sha256 in listed.items():
        path = folder.parent / file
        if not path.is_file():
            return f"{file} is missing"
        if model_lib.sha256_file(path) != sha256:
            return f"{file} is damaged (its sha256 differs from the manifest's)"
    return None


def load_resume_state(out: Path, args, identity: dict, env: Setup) -> tuple[Path, dict]:
    """The newest intact checkpoint's folder and its state (step, optimizer, data position, RNG), checked before the
    model loads: the one checkpoints/latest names, else the others from the newest, falling back with a message past
    any whose files do not match their manifest. Refuses when the run's settings, process count, dtype, data or model
    differ from the checkpoint's (run.json), or when no checkpoint is intact."""
    folder = out / "checkpoints"
    names = sorted((p.name for p in folder.glob("step-*") if p.is_dir()), reverse=True)
    latest = (folder / "latest").read_text(errors="replace").strip() if (folder / "latest").is_file() else None
    damaged = []
    for name in sorted(names, key=lambda n: n != latest):  # latest first, then newest first
        problem = checkpoint_problem(folder / name)
        if problem is None:
            try:
                state = torch.load(folder / name / "state.pt", weights_only=True, map_location="cpu")
                problem = None if {"step", "optimizer", "data", "rng"} <= set(state) else "state.pt lacks keys"
            except Exception as e:  # noqa: BLE001 - any failure to read it means the same: not this checkpoint
                problem = f"state.pt cannot be read ({type(e).__name__}: {e})"
        if problem:
            damaged.append(f"{name}: {problem}")
            continue
        if damaged:
            env.log(f"warning: skipping damaged checkpoints ({'; '.join(damaged)}); resuming from {name}")
        check_same_run(folder, identity)
        return folder / name, state
    refuse([f"cannot resume: no intact checkpoint in {folder} ({'; '.join(damaged) or 'none was written'}). Start over "
            f"with --overwrite (it deletes them), or choose another --out_dir"])


def check_same_run(folder: Path, identity: dict) -> None:
    """Refuse to resume a run whose settings, processes, dtype, training data or model differ from the recorded ones
    (checkpoints/run.json, verified by the manifests), or whose initial adapter is damaged."""
    recorded = json.loads((folder / "run.json").read_text())
    adapter_sha256 = recorded.pop("initial_adapter sha256", None)
    changed = [f"--{key}: {recorded['settings'].get(key)!r} -> {value!r}" for key, value in identity["settings"].items()
               if recorded["settings"].get(key) != value]
    changed += [f"{key}: {recorded.get(key)!r} -> {value!r}" for key, value in identity.items()
                if key != "settings" and recorded.get(key) != value]
    if changed:
        refuse([f"cannot resume: this run differs from the checkpoint's ({'; '.join(changed)}); resume with what it "
                f"had, or start over with --overwrite"])
    if adapter_sha256 and model_lib.sha256_file(folder / "initial_adapter.safetensors") != adapter_sha256:
        refuse([f"cannot resume: {folder / 'initial_adapter.safetensors'} is damaged (its sha256 differs from "
                f"run.json's), and every checkpoint needs it; start over with --overwrite"])


def resume_position(state: dict, optimizer, batches: data.Batches, env: Setup) -> int:
    """Put the optimizer, the data order and the RNGs where the checkpoint left them; returns its step."""
    optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["data"])
    set_rng_states(state["rng"], env.device)
    return state["step"]


def restore_trainable(model, checkpoint: Path, method: str) -> None:
    """The trained weights of a checkpoint: an adapter as initialized (B and A come from sampled data and an SVD: they
    are reloaded, never re-estimated), then the checkpoint's values of what trains."""
    if method != "full":
        lorasb.load_adapter(model, checkpoint.parent / "initial_adapter.safetensors")
    tensors, _ = lorasb.load_safetensors(checkpoint / "trainable.safetensors")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    mismatched = sorted(name for name in tensors.keys() | trainable.keys()
                        if name not in tensors or name not in trainable or tensors[name].shape != trainable[name].shape)
    if mismatched:
        refuse([f"cannot resume: {checkpoint / 'trainable.safetensors'} does not fit the model ({mismatched[:3]})"])
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[name])


# ---------------------------------------------------------------------------------------------------------------------
# Training: AdamW on whatever requires grad, gradient accumulation over micro-batches, the LR schedule above.
# ---------------------------------------------------------------------------------------------------------------------

def make_optimizer(model, args, device: torch.device) -> torch.optim.AdamW:
    trainable = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel (CUDA, and CPU since torch 2.4) updates every tensor in one pass instead of a loop of small ops
    return torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay,
                             fused=device.type in ("cuda", "cpu"))


def train_step(run_model, optimizer, batches: data.Batches, step: int, args, plan: Plan, env: Setup) -> dict:
    """Optimizer step `step` (1-based): set its LR, accumulate the gradients of plan.grad_accum micro-batches (DDP
    all-reduces them on the last one only), clip, AdamW. Returns the step's mean loss, LR, gradient norm and the
    number of tokens it saw on this process, as tensors or numbers that cost no device sync."""
    lr = learning_rate(step, args.lr, plan.warmup_steps, plan.total_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum, tokens = torch.zeros((), device=env.device), 0
    for micro in range(plan.grad_accum):
        batch = batches.next_batch()
        tokens += int(batch["attention_mask"].sum())
        sync = micro == plan.grad_accum - 1
        with (run_model.no_sync() if env.ddp and not sync else nullcontext()), env.autocast():
            loss = causal_lm_loss(run_model, to_device(batch, env.device)) / plan.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}


# B and A (buffers) are the same on every process by construction: DDP need not broadcast them before each forward.
# Newer torch deprecates broadcast_buffers=False for forward_sync_buffers=False (which still syncs them once, at
# construction: harmless); torch 2.5, which requirements.txt admits, has only the former.
NO_BUFFER_SYNC_PER_FORWARD = ({"forward_sync_buffers": False}
                              if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                              else {"broadcast_buffers": False})


def train(model, optimizer, batches: data.Batches, start_step: int, args, plan: Plan, env: Setup, out: Path) -> float:
    """Steps start_step + 1 .. plan.total_steps: log every --log_every steps to metrics.jsonl and the progress bar,
    checkpoint every --save_every steps and at the end. Returns the seconds it took."""
    run_model = torch.compile(model) if args.compile else model
    if env.ddp:
        run_model = DistributedDataParallel(run_model, device_ids=[env.device.index] if env.device.type == "cuda"
                                            else None, **NO_BUFFER_SYNC_PER_FORWARD)
    env.log(f"training: {plan.total_steps} steps of {args.batch_size} examples ({plan.grad_accum} x "
            f"{args.micro_batch_size} x {env.ddp_world_size}), lr {args.lr:g} (warmup {plan.warmup_steps}, cosine), "
            f"weight decay {args.weight_decay:g}")
    t0 = last_log = time.time()
    tokens = 0
    diverged_at = torch.zeros((), dtype=torch.long, device=env.device)  # first step with a NaN/inf loss or grad norm
    run_model.train()
    bar = tqdm(range(start_step + 1, plan.total_steps + 1), initial=start_step, total=plan.total_steps,
               desc="training", disable=not env.master_process)
    for step in bar:
        result = train_step(run_model, optimizer, batches, step, args, plan, env)
        finite = torch.isfinite(result["loss"]) & torch.isfinite(result["grad_norm"])
        diverged_at.masked_fill_((diverged_at == 0) & ~finite, step)  # on the device: no sync per step
        tokens += result["tokens"] * env.ddp_world_size
        saving = step % args.save_every == 0 or step == plan.total_steps
        if saving or step % args.log_every == 0:
            stop_if_diverged(diverged_at, optimizer if saving else None, step, args, env, out)
        if step % args.log_every == 0 or step == plan.total_steps:
            loss = result["loss"]
            if env.ddp:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            now = time.time()
            row = {"step": step, "loss": loss.item(), "lr": result["lr"], "grad_norm": result["grad_norm"].item(),
                   "tokens_per_s": tokens / (now - last_log), "elapsed_s": now - t0}
            tokens, last_log = 0, now
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if env.master_process:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(strict_json(row) + "\n")
        if saving:
            if env.master_process:
                save_checkpoint(out, step, model, optimizer, batches, args, env.device)
            if env.ddp:
                dist.barrier()
    return time.time() - t0


def stop_if_diverged(diverged_at: torch.Tensor, optimizer, step: int, args, env: Setup, out: Path) -> None:
    """Stop the run with a clear message, before anything more is saved, once a step's loss or gradient norm was NaN or
    inf (the weights that train then are, or soon will be), or, given the optimizer (before a save), when a weight it
    trains is. The checkpoints already written stay as they are."""
    if env.ddp:
        dist.all_reduce(diverged_at, op=dist.ReduceOp.MAX)
    first = int(diverged_at.item())
    if not first and optimizer is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        first = 0 if torch.stack([torch.isfinite(p).all() for p in params]).all() else step
    if first:  # every process stops; process 0 says why
        sys.exit(f"Stopped at step {step}: training diverged (the loss, the gradient norm or the weights became NaN or "
                 f"inf at step {first}). Nothing from step {first} on was saved; the checkpoints in "
                 f"{out / 'checkpoints'} are as they were. Start over with a lower --lr (this run: {args.lr:g}) and "
                 f"--overwrite." if env.master_process else 1)


def start_outputs(out: Path, args, plan: Plan, loaded: Loaded, num_trainable: int, start_step: int,
                  env: Setup) -> None:
    """config.json with every setting resolved, and metrics.jsonl cut back to the resumed step (process 0 only)."""
    if not env.master_process:
        return
    write_json(out / "config.json", {**vars(args), **vars(plan), "world_size": env.ddp_world_size,
                                     "trainable_parameters": num_trainable, "model_config": vars(loaded.config),
                                     "torch": torch.__version__})
    metrics_path = out / "metrics.jsonl"
    lines = metrics_path.read_text(errors="replace").splitlines() if metrics_path.exists() else []
    kept = [line for line in lines if metrics_step(line) <= start_step]  # a resumed run rewrites what came after
    lorasb.atomic_write(metrics_path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def metrics_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line a crash or a full disk cut short (it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def save_outputs(model, out: Path, args, folder: Path) -> None:
    """The adapter and its PEFT export, or for full fine-tuning a model folder that --model (and transformers) loads."""
    if args.method == "full":
        (out / "model").mkdir(exist_ok=True)
        save_trainable(model, out / "model" / "model.safetensors", args.method, args.model)
        for name in MODEL_FOLDER_FILES:
            if (folder / name).is_file():
                shutil.copy(folder / name, out / "model" / name)
    else:
        save_trainable(model, out / "adapter.safetensors", args.method, args.model)
        lorasb.export_peft(model, out / "peft_adapter", base_model=args.model)


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation: the model as evaluated (--eval_merge), the held-out loss, then on each test set batched greedy decoding
# with a KV cache, the authors' prompt, stop strings and scoring.
# ---------------------------------------------------------------------------------------------------------------------

def generate_answers(model, tokenizer: data.Tokenizer, questions: list[dict], eos_ids: set[int], args,
                     env: Setup, eval_set: str = "gsm8k") -> list[dict]:
    """Greedy completions of this process's share of the questions of `eval_set`, cut at the authors' stop strings,
    after at most --max_new_tokens (GSM8K) or --math_max_new_tokens (MATH) new tokens. Each row holds the question,
    its gold answer (GSM8K: the number after "#### "; MATH: the reference's \\boxed{} answer), MATH's subject and level
    when the file has them, and the completion."""
    mine = env.my_share(len(questions))
    prompts = [tokenizer.encode(data.eval_prompt(questions[i]["question"])) for i in mine]
    max_new_tokens = args.max_new_tokens if eval_set == "gsm8k" else args.math_max_new_tokens
    # Stop strings are matched on the generated text only (the prompt contains "Instruction:" and "Response:");
    # the last few tokens suffice to see a new one, so each check decodes a short tail.
    stop = lambda new: any(s in tokenizer.decode(new[-8:]) for s in data.STOP_STRINGS)  # noqa: E731
    # generate sorts the prompts by length into batches (less padding) and shows a progress bar over them
    outputs = model_lib.generate(model, prompts, max_new_tokens, eos_ids, tokenizer.pad_id, stop=stop,
                                 batch_size=args.eval_batch_size)
    rows = []
    for i, new in zip(mine, outputs):
        question = questions[i]
        gold = data.gold_answer(question["answer"]) if eval_set == "gsm8k" else question["answer"]
        rows.append({"index": i, "question": question["question"], "gold": gold,
                     **{key: question[key] for key in ("subject", "level") if key in question},
                     "completion": data.cut_at_stop(tokenizer.decode(new, skip_special_tokens=True))[0]})
    return rows


def held_out_loss(model, tokenizer: data.Tokenizer, questions: list[dict], args, env: Setup) -> float:
    """Mean next-token loss per response token of the reference solutions, in the training format (teacher forcing):
    a smoother measure than accuracy for comparing methods on the same budget."""
    pairs = [(data.TRAIN_PROMPT.format(instruction=questions[i]["question"]),
              data.gsm8k_response(questions[i]["answer"]))
             for i in env.my_share(len(questions))]
    examples, _ = data.tokenize_dataset(tokenizer, pairs, args.max_length)
    sums = torch.zeros(2, dtype=torch.float64, device=env.device)  # (loss * tokens, tokens)
    for start in tqdm(range(0, len(examples), args.micro_batch_size), desc="held-out loss", unit="batch",
                      disable=not env.master_process):
        batch = to_device(data.collate(examples[start:start + args.micro_batch_size], tokenizer.pad_id), env.device)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        sums += torch.stack([causal_lm_loss(model, batch, reduction="sum").double(), tokens.double()])
    if env.ddp:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def prepare_evaluation(model, args, env: Setup) -> None:
    """Put the model in the form it is evaluated in.

    --eval_merge exact (default): with fp32 weights the adapters are merged (W0 + B R A in fp32: the same function as
    unmerged, at the base model's cost); with bf16 weights they run unmerged, because W0 + B R A rounded to bf16
    (about 3 significant digits of W0) loses much of the small trained delta: three thin matmuls a layer instead.
    --eval_merge bf16 is the model the authors evaluated (PEFT's merge_and_unload, then vLLM, in bf16): the adapters
    merged, then every weight in bf16, so the trained delta is rounded together with W0. (Their merge also computed
    B R A in bf16; here it is computed in fp32 and the sum is rounded once.)"""
    model.eval()
    if args.eval_merge == "bf16" or env.weights_dtype == torch.float32:
        lorasb.merge_adapters(model)
    if args.eval_merge == "bf16":
        for p in model.parameters():  # not model.to(), which would round the fp32 RoPE frequencies too
            p.data = p.data.to(torch.bfloat16)


def score_gsm8k(rows: list[dict]) -> tuple[dict, list[dict]]:
    """GSM8K accuracy, correct, invalid and total, and the rows with their extracted answer and verdict."""
    scored = data.score([r["completion"] for r in rows], [r["gold"] for r in rows])
    rows = [{**r, "extracted": extracted, "correct": correct}
            for r, extracted, correct in zip(rows, scored["extracted"], scored["is_correct"])]
    return {k: scored[k] for k in ("accuracy", "correct", "invalid", "total")}, rows


def score_math(rows: list[dict]) -> tuple[dict, list[dict]]:
    """MATH accuracy, correct, invalid and total, scored correctly; beside them what the authors' is_equiv fallback
    gives (accuracy_authors_fallback, the figure comparable with their published MATH numbers) and how many verdicts
    it flips; the accuracy by subject and by level when the file has them; and the rows with their extracted answer
    and both verdicts."""
    scored = data.score_math([r["completion"] for r in rows], [r["gold"] for r in rows])
    rows = [{**r, "extracted": extracted, "correct": correct, "correct_authors_fallback": authors}
            for r, extracted, correct, authors in zip(rows, scored["extracted"], scored["is_correct"],
                                                      scored["is_correct_authors_fallback"])]
    metrics = {k: scored[k] for k in ("accuracy", "correct", "invalid", "total", "accuracy_authors_fallback",
                                      "changed_by_authors_fallback")}
    for field in ("subject", "level"):
        if all(field in r for r in rows):
            metrics[f"by_{field}"] = accuracy_by(rows, field)
    return metrics, rows


def accuracy_by(rows: list[dict], field: str) -> dict:
    """{value of `field`: {accuracy, correct, total}} over the scored rows, in sorted order of the values."""
    verdicts = {}
    for r in rows:
        verdicts.setdefault(r[field], []).append(r["correct"])
    return {value: {"accuracy": sum(v) / len(v), "correct": sum(v), "total": len(v)}
            for value, v in sorted(verdicts.items())}


def evaluate(model, loaded: Loaded, args, env: Setup) -> tuple[dict, dict[str, list[dict]]]:
    """The held-out loss on GSM8K's test solutions, and the scored answers of every problem of each --eval_data set
    (gathered from all processes, in order). Returns the metrics, GSM8K's at the top level and MATH's under "math",
    and the scored rows of each set."""
    prepare_evaluation(model, args, env)
    problems = {"gsm8k": loaded.questions, "math": loaded.math_problems}
    score = {"gsm8k": score_gsm8k, "math": score_math}
    metrics, predictions = {}, {}
    with torch.no_grad(), env.autocast():
        test_loss = held_out_loss(model, loaded.tokenizer, loaded.questions, args, env)
        for eval_set in args.eval_data:
            rows = generate_answers(model, loaded.tokenizer, problems[eval_set], loaded.eos_ids, args, env, eval_set)
            if env.ddp:
                gathered = [None] * env.ddp_world_size
                dist.all_gather_object(gathered, rows)
                rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
            metrics[eval_set], predictions[eval_set] = score[eval_set](rows)
    return {**metrics.pop("gsm8k", {}), "test_loss": test_loss, **metrics}, predictions


def report(model, loaded: Loaded, args, env: Setup, out: Path, described: dict) -> dict:
    """Evaluate, then write the predictions of each test set (predictions.jsonl for GSM8K, predictions_math.jsonl)
    and summary.json and print the summary (process 0); returns the summary. `described` names what was evaluated
    (method, rank, trainable parameters, timings)."""
    metrics, predictions = evaluate(model, loaded, args, env)
    summary = {**metrics, **described, "model": args.model, "eval_merge": args.eval_merge,
               "peak_memory_bytes": peak_memory_bytes(env.device)}
    if env.master_process:
        out.mkdir(parents=True, exist_ok=True)
        for eval_set, rows in predictions.items():
            write_jsonl(out / EVAL_SETS[eval_set], rows)
        write_json(out / "summary.json", summary)
        print_summary(summary, out)
    return summary


def write_jsonl(path: Path, rows: list[dict]) -> None:
    lorasb.atomic_write(path, lambda f: f.write("".join(strict_json(r) + "\n" for r in rows).encode()))


def write_json(path: Path, obj) -> None:
    lorasb.atomic_write(path, lambda f: f.write((strict_json(obj, indent=2) + "\n").encode()))


def strict_json(obj, **options) -> str:
    """JSON that every parser reads: json.dumps writes NaN and infinity as bare NaN / Infinity, which is not JSON; here
    they become null (e.g. the held-out loss of a test set whose answers --max_length cuts off entirely)."""
    def finite(value):
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value
    return json.dumps(finite(obj), allow_nan=False, **options)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def print_summary(summary: dict, out: Path) -> None:
    accuracies = []
    if "accuracy" in summary:
        accuracies.append(f"GSM8K test: {summary['accuracy']:.2%} ({summary['correct']}/{summary['total']}, "
                          f"{summary['invalid']} without an answer)")
    if "math" in summary:
        m = summary["math"]
        accuracies.append(f"MATH test: {m['accuracy']:.2%} ({m['correct']}/{m['total']}, {m['invalid']} without an "
                          f"answer); with the authors' is_equiv fallback {m['accuracy_authors_fallback']:.2%} "
                          f"({m['changed_by_authors_fallback']} verdicts flipped)")
    print(f"\n{'=' * 72}\n" + "\n".join(accuracies) + f"\nheld-out GSM8K loss {summary['test_loss']:.4f}  "
          f"[{summary['method']}, rank {summary['rank']}, {summary['model']}]\n"
          f"trainable parameters {summary['trainable_parameters']:,} | init {summary['init_seconds']:.1f} s | "
          f"training {summary['train_seconds']:.1f} s | peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB\n"
          f"outputs in {out}/ (summary.json, predictions*.jsonl, metrics.jsonl, adapter)\n{'=' * 72}")


# ---------------------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    env = setup(args)
    loaded = load(args, env)
    if args.eval_only:
        out = prepare_out_dir(args, env)
        model = model_lib.load_model(loaded.folder, device=env.device, dtype=env.weights_dtype)
        return finish(report(model, loaded, args, env, out, load_adapter_to_evaluate(model, args, env)), env)

    examples = training_examples(loaded, args, env)  # the data and the schedule are checked before any weight loads
    plan = plan_training(args, len(examples), env.ddp_world_size)
    identity = run_identity(args, loaded, env)
    checkpoint, state = load_resume_state(Path(args.out_dir), args, identity, env) if args.resume else (None, None)
    out = prepare_out_dir(args, env)
    model = model_lib.load_model(loaded.folder, device=env.device, dtype=env.weights_dtype)
    reference_counts = parameter_counts(model, args.targets)
    t0 = time.time()
    if checkpoint:
        restore_trainable(model, checkpoint, args.method)
    else:
        env.log(initialize_adapters(model, examples, loaded.tokenizer.pad_id, args, plan, env) or "full fine-tuning")
        start_checkpoints(out, model, identity, args, env)
    init_seconds = time.time() - t0
    num_trainable = describe_trainable(model, reference_counts, env)

    batches = data.Batches(examples, args.micro_batch_size, args.seed, rank=env.ddp_rank,
                           world_size=env.ddp_world_size, pad_id=loaded.tokenizer.pad_id)
    optimizer = make_optimizer(model, args, env.device)
    start_step = resume_position(state, optimizer, batches, env) if state else 0
    if state:
        env.log(f"resumed from {checkpoint} at step {start_step}")
    start_outputs(out, args, plan, loaded, num_trainable, start_step, env)
    train_seconds = train(model, optimizer, batches, start_step, args, plan, env, out)
    if env.master_process:
        save_outputs(model, out, args, loaded.folder)

    described = {"method": args.method, "rank": args.rank, "trainable_parameters": num_trainable,
                 "init_seconds": init_seconds, "train_seconds": train_seconds}
    return finish(report(model, loaded, args, env, out, described), env)


def prepare_out_dir(args, env: Setup) -> Path:
    """--out_dir, created by process 0; with --overwrite, first cleared of what an earlier run left there. The
    temporary files and checkpoint folders of writes that a kill interrupted (model-sized for full fine-tuning) go."""
    out = Path(args.out_dir)
    if env.master_process:
        if args.overwrite:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            for stale in ("metrics.jsonl", "summary.json", *EVAL_SETS.values()):
                (out / stale).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        lorasb.remove_interrupted_writes(out)
        for interrupted in (out / "checkpoints").glob(".tmp-step-*"):
            shutil.rmtree(interrupted)
    return out


def load_adapter_to_evaluate(model, args, env: Setup) -> dict:
    """With --eval_only: load --adapter if given; returns what the summary says was evaluated."""
    described = {"method": "base", "rank": None, "trainable_parameters": 0, "init_seconds": 0.0, "train_seconds": 0.0}
    if args.adapter:
        info = lorasb.load_adapter(model, args.adapter)
        described.update(method=info["method"], rank=info["rank"])
        env.log(f"loaded {info['method']} adapter (rank {info['rank']}) from {args.adapter}")
        if info.get("base_model") and canonical_model(info["base_model"]) != canonical_model(args.model):
            env.warn(f"{args.adapter} was trained on {info['base_model']}, not on --model {args.model}: unless they "
                     f"are the same model, the evaluation is of a mismatched adapter")
    return described


def finish(summary: dict, env: Setup) -> dict:
    """Under torchrun, once every process is done, leave the process group cleanly."""
    if env.ddp:
        dist.barrier()
        leave_process_group()
    return summary


if __name__ == "__main__":
    main()
