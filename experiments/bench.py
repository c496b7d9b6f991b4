"""Speed and memory of LoRA-SB beside LoRA-XS, LoRA, full fine-tuning and the frozen-backward floor, and beside
transformers + PEFT, printed as one markdown table (paste it into the README).

The SmolLM2-135M checkpoint (env LORASB_SMOLLM2_DIR, default ~/.cache/lorasb-dev/SmolLM2-135M-Instruct), on CPU or GPU:
    python -m experiments.bench
Any local Hugging Face model folder:
    python -m experiments.bench --model path/to/model --device cuda
Random weights with the shapes of a real model (no download; speed and memory do not depend on weight values):
    python -m experiments.bench --config qwen2.5-0.5b --device cuda --batch 8 --seq 512
    python -m experiments.bench --config mistral-7b --device cuda --batch 4 --seq 512 --json out/mistral-7b.json

What one run measures (CUDA timings are synchronized; bf16 weights run under bf16 autocast, as in train_gsm8k.py):
  - the training step, forward + backward + gradient clipping + AdamW (the trainer's step), on one fixed batch of
    random token ids, median of --steps steps after 2 warm-up steps, for lorasb (rank --rank), loraxs (same rank),
    lora (r=32, alpha 64), full, and "frozen": every weight frozen but the embedding output requiring grad, so
    backward computes the activation gradients of every layer and nothing else: the floor any adapter can reach;
  - the initialization: estimate_first_update on the trainer's default number of samples, plus the SVDs of all targets;
  - peak memory of each training method: CUDA max_memory_allocated, or on CPU the process's peak RSS (VmHWM);
  - greedy generation tokens/s (model.generate) at batch 1 and 16; tokenizer throughput on GSM8K train;
  - MFU on GPU; and, when transformers and peft are installed, the same step with PEFT LoRA and transformers' generate.
"""

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch

import data
import lorasb
import model as model_lib
import train_gsm8k
from train_gsm8k import causal_lm_loss, learning_rate

from data import Tokenizer

DEFAULT_MODEL = os.environ.get("LORASB_SMOLLM2_DIR",
                               str(Path.home() / ".cache" / "lorasb-dev" / "SmolLM2-135M-Instruct"))
GSM8K_DIR = os.environ.get("LORASB_GSM8K_DIR")  # a folder with GSM8K train.jsonl, for the tokenizer figures

# config.json of real models (the shapes are all that matters here), and a tiny one for tests.
CONFIGS = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, hidden_act="silu",
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=32768,
                         use_sliding_window=False, max_window_layers=24, hidden_act="silu", tie_word_embeddings=True,
                         bos_token_id=151643, eos_token_id=151643),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_theta=10000.0, max_position_embeddings=32768, sliding_window=4096, hidden_act="silu",
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "tiny": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, hidden_act="silu",
                 tie_word_embeddings=True, eos_token_id=2),
}
LORA_RANK, LORA_ALPHA = 32, 64.0  # the paper's LoRA baseline
GSM8K_TRAIN_EXAMPLES = 7473
INIT_SAMPLES = max(32, round(0.001 * GSM8K_TRAIN_EXAMPLES))  # train_gsm8k.py's default --num_init_samples on GSM8K
WARMUP_STEPS = 2
PROMPT_LEN, NEW_TOKENS = 64, 64
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks (datasheets)
DEFAULTS = {"cpu": dict(batch=2, seq=128, steps=3), "cuda": dict(batch=8, seq=512, steps=10)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help=f"local Hugging Face model folder (default: {DEFAULT_MODEL})")
    a("--config", default=None, help=f"instead of --model, random weights of these shapes: {', '.join(CONFIGS)}")
    a("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    a("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on GPU, fp32 on CPU)")
    a("--batch", type=int, default=None, help="examples per step, also the micro batch of the estimate "
      "(default: 2 on CPU, 8 on GPU)")
    a("--seq", type=int, default=None, help="tokens per example (default: 128 on CPU, 512 on GPU)")
    a("--steps", type=int, default=None, help=f"timed steps after {WARMUP_STEPS} warm-up steps "
      "(default: 3 on CPU, 10 on GPU)")
    a("--rank", type=int, default=96, help="rank of lorasb and loraxs (LoRA uses r=32, alpha 64)")
    a("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    problems = []
    if args.model and args.config:
        problems.append("pass --model or --config, not both")
    if args.config and args.config not in CONFIGS:
        problems.append(f"--config {args.config!r}: choose one of {', '.join(CONFIGS)}")
    if not args.config:
        args.model = args.model or DEFAULT_MODEL
        if not (Path(args.model) / "config.json").is_file():
            raise FileNotFoundError(f"--model {args.model}: no config.json there; pass a local model folder (set "
                                    f"LORASB_SMOLLM2_DIR for the default), "
                                    f"or --config NAME for random weights")
    if args.dtype not in (None, "bfloat16", "float32"):
        problems.append(f"--dtype {args.dtype!r}: choose bfloat16 or float32")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, value in DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    problems += [f"--{name} must be positive, got {getattr(args, name)}" for name in ("batch", "seq", "steps", "rank")
                 if getattr(args, name) < 1]
    if problems:
        raise ValueError("bench.py: " + "; ".join(problems))
    args.dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Models, batches, timing and memory.
# ---------------------------------------------------------------------------------------------------------------------

def hf_config(args) -> dict:
    return CONFIGS[args.config] if args.config else json.loads((Path(args.model) / "config.json").read_text())


def random_model(config: model_lib.ModelConfig, device, dtype) -> model_lib.Transformer:
    """The model with weights ~ N(0, 0.02) and norms 1, made directly on `device` in `dtype` (a 7B model never exists
    in fp32 nor on the CPU)."""
    model = model_lib.build_model(config, device, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


def fresh_model(args) -> model_lib.Transformer:
    """A new copy of the benchmarked model (every method starts from its own)."""
    torch.manual_seed(0)
    if args.config:
        return random_model(model_lib.ModelConfig.from_hf(CONFIGS[args.config]), args.device, args.dtype)
    return model_lib.load_model(args.model, device=args.device, dtype=args.dtype)


def random_batch(vocab_size: int, batch: int, seq: int, device, seed: int = 0) -> dict:
    """A training batch of random token ids (B, T), every position labelled, no padding (the trainer's dict)."""
    ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, dtype=torch.bool, device=device),
            "labels": ids.to(device)}


def autocast_for(args):
    """bf16 autocast when the weights are bf16, as train_gsm8k.py trains (fp32 runs without autocast)."""
    return torch.autocast(args.device.type, dtype=torch.bfloat16) if args.dtype == torch.bfloat16 else nullcontext()


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    """Seconds fn() takes, with the device's queued work finished before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def reset_peak_memory(device) -> bool:
    """Start a new peak-memory measurement from what is live now; False when the peak cannot be reset (on CPU it then
    counts from the start of the process)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # glibc keeps freed heap pages; hand them back so the new peak starts at the live memory
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: resets VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def proc_status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(device) -> int:
    """Peak bytes since reset_peak_memory: CUDA allocated tensors, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def release_memory() -> None:
    """Return what the caller just deleted to the device, so the next measurement starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def matmul_params(model: torch.nn.Module) -> int:
    """N of the 2N FLOPs per token of a forward pass: the weights of every nn.Linear, lm_head included (a tied
    embedding costs no FLOPs as a lookup, but does as lm_head)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def peak_flops(args) -> float | None:
    """The GPU's dense bf16 peak from PEAK_BF16_FLOPS; None on CPU, in fp32, or for a GPU not in the table."""
    if args.device.type != "cuda" or args.dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(args.device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ---------------------------------------------------------------------------------------------------------------------
# Training step, per method.
# ---------------------------------------------------------------------------------------------------------------------

def random_updates(model: torch.nn.Module, lr: float) -> dict[str, torch.Tensor]:
    """An `updates` dict of the right shapes for add_adapters("lorasb"): -lr * sign(noise), fp32, on the model's
    device (the values change what B, R, A hold, not how fast they run)."""
    return {name: lorasb.adamw_first_step(torch.randn(m.weight.shape, device=m.weight.device), lr)
            for name, m in lorasb.find_targets(model).items()}


def prepare(model: model_lib.Transformer, method: str, rank: int) -> None:
    """Turn a fresh model into what `method` trains. Adapter SVDs are randomized here (the factors' values do not
    change the step time; the exact SVD is timed in bench_init)."""
    if method == "lorasb":
        lorasb.add_adapters(model, "lorasb", rank, updates=random_updates(model, 1e-4), randomized_svd=True)
    elif method == "loraxs":
        lorasb.add_adapters(model, "loraxs", rank, randomized_svd=True)
    elif method == "lora":
        lorasb.add_adapters(model, "lora", LORA_RANK, lora_alpha=LORA_ALPHA)
    elif method == "frozen":  # no weight trains, but backward still runs through every layer down to the embedding
        for p in model.parameters():
            p.requires_grad_(False)
        model.model.embed_tokens.register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    elif method != "full":
        raise ValueError(f"unknown method {method!r}")


def step_time(loss_fn, batch: dict, params: list, device, steps: int) -> float:
    """Median seconds of one training step, the trainer's: loss.backward(), clip the gradient norm to 1, AdamW step,
    zero the gradients. With no trainable parameters (the frozen floor) the step is forward + backward alone."""
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda") if params else None

    def step():
        loss_fn(batch).backward()
        if optimizer:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    times = [timed(step, device) for _ in range(WARMUP_STEPS + steps)]
    return statistics.median(times[WARMUP_STEPS:])


def training_row(model: torch.nn.Module, loss_fn, args, vocab_size: int, flops_per_token: float) -> dict:
    """Step time, throughput, peak memory and MFU of training `model` (adapters already in place)."""
    params = [p for p in model.parameters() if p.requires_grad]
    batch = random_batch(vocab_size, args.batch, args.seq, args.device)
    model.train()
    peak_resettable = reset_peak_memory(args.device)
    seconds = step_time(loss_fn, batch, params, args.device, args.steps)
    tokens_per_s = args.batch * args.seq / seconds
    peak = peak_flops(args)
    return {"step_s": seconds, "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak_memory(args.device),
            "peak_memory_per_method": peak_resettable, "trainable": sum(p.numel() for p in params),
            "mfu": flops_per_token * tokens_per_s / peak if peak else None}


def bench_training(args, method: str) -> dict:
    """One method on its own fresh model, as train_gsm8k.py runs it."""
    model = fresh_model(args)
    n = matmul_params(model)
    prepare(model, method, args.rank)
    autocast = autocast_for(args)

    def loss_fn(batch):
        with autocast:
            return causal_lm_loss(model, batch)

    # forward 2N + activation gradients 2N per token, + 2N for the weight gradients when every weight trains
    row = training_row(model, loss_fn, args, model.config.vocab_size, (6 if method == "full" else 4) * n)
    del model, loss_fn
    release_memory()
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Initialization: the first-update estimate and the SVDs.
# ---------------------------------------------------------------------------------------------------------------------

def trainer_lr_1() -> float:
    """lr_1 of train_gsm8k.py's default GSM8K schedule (its value does not change the timing)."""
    defaults = train_gsm8k.parse_args([])
    total = defaults.epochs * (GSM8K_TRAIN_EXAMPLES // defaults.batch_size)
    return learning_rate(1, defaults.lr, math.ceil(defaults.warmup_ratio * total), total)


def bench_init(args) -> dict:
    """Seconds of estimate_first_update on INIT_SAMPLES examples (micro batch --batch), and of the SVDs of all targets,
    exact and randomized: lorasb_factors is timed once per distinct target shape and multiplied by the number of targets
    of that shape (an SVD's time depends on the shape, and a 7B model has 224 targets of 4 shapes)."""
    model = fresh_model(args)
    autocast = autocast_for(args)
    batches = [random_batch(model.config.vocab_size, args.batch, args.seq, args.device, seed=1 + i)
               for i in range(math.ceil(INIT_SAMPLES / args.batch))]

    def loss_fn(m, batch):
        with autocast:
            return causal_lm_loss(m, batch)

    updates = {}

    def estimate():
        updates.update(lorasb.estimate_first_update(model, batches, loss_fn, INIT_SAMPLES, trainer_lr_1()))

    estimate_s = timed(estimate, args.device)
    del model, batches
    release_memory()
    shapes = Counter(tuple(u.shape) for u in updates.values())
    examples = {tuple(u.shape): u for u in updates.values()}
    lorasb.lorasb_factors(torch.randn(64, 64, device=args.device), 8)  # load the solver libraries before timing
    svd_s = {}
    for randomized in (False, True):
        svd_s[randomized] = sum(count * timed(lambda: lorasb.lorasb_factors(examples[shape], args.rank,
                                                                            randomized=randomized), args.device)
                                for shape, count in shapes.items())
    del updates, examples
    release_memory()
    return {"samples": INIT_SAMPLES, "estimate_s": estimate_s, "svd_exact_s": svd_s[False],
            "svd_randomized_s": svd_s[True], "targets": sum(shapes.values()), "target_shapes": len(shapes)}


# ---------------------------------------------------------------------------------------------------------------------
# Generation and tokenizers.
# ---------------------------------------------------------------------------------------------------------------------

def random_prompts(vocab_size: int, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab_size, (batch, PROMPT_LEN), generator=g).tolist()


def bench_generation(args) -> dict:
    """Greedy tokens/s of model.generate at batch 1 and 16: PROMPT_LEN-token prompts (equal lengths, so no padding),
    NEW_TOKENS new tokens each (no EOS stop), one warm-up call first."""
    model = fresh_model(args)
    result = {}
    for batch in (1, 16):
        prompts = random_prompts(model.config.vocab_size, batch)

        def run(new_tokens):
            out = model_lib.generate(model, prompts, new_tokens, eos_ids=set(), pad_id=0, batch_size=batch)
            if any(len(o) != new_tokens for o in out):
                raise RuntimeError(f"model.generate returned {[len(o) for o in out]} tokens, not {new_tokens} each")

        run(2)
        result[batch] = batch * NEW_TOKENS / timed(lambda: run(NEW_TOKENS), args.device)
    del model
    release_memory()
    return result


def bench_tokenizers(args) -> dict | str:
    """Tokens/s encoding every GSM8K train question and answer, one text at a time, with our Tokenizer and with
    `tokenizers` (when installed); a note (str) when GSM8K or the tokenizer is not there."""
    if args.config:
        return "skipped: --config models have no tokenizer (pass --model FOLDER)"
    folder = Path(args.model)
    if not (folder / "tokenizer.json").is_file():
        return f"skipped: {folder} has no tokenizer.json"
    if not GSM8K_DIR or not (Path(GSM8K_DIR) / "train.jsonl").is_file():
        return "skipped: no GSM8K train.jsonl (set LORASB_GSM8K_DIR to a folder holding it)"
    texts = [row[key] for row in data.load_gsm8k("train", GSM8K_DIR) for key in ("question", "answer")]
    encoders = {"ours": Tokenizer.from_dir(folder).encode}
    if importlib.util.find_spec("tokenizers"):
        import tokenizers
        theirs = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        encoders["tokenizers"] = lambda text: theirs.encode(text).ids
    result = {"texts": len(texts)}
    for name, encode in encoders.items():
        t0 = time.perf_counter()
        tokens = sum(len(encode(text)) for text in texts)
        result[name] = {"tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - t0)}
    return result


# ---------------------------------------------------------------------------------------------------------------------
# transformers + PEFT, on the same checkpoint (or config) and settings.
# ---------------------------------------------------------------------------------------------------------------------

def hf_model(args):
    """The transformers model: the same folder, or the same config with random weights made on the device."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if args.config:
        config = AutoConfig.for_model(**CONFIGS[args.config])
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=args.dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, attn_implementation="sdpa")
    return model.to(args.device).eval()


def bench_hf(args) -> dict | str:
    """transformers' greedy generate (batch 1 and 16, equal-length prompts, no EOS stop) and the PEFT LoRA training step
    (r=32, alpha 64, the seven targets); a note (str) when transformers or peft is missing."""
    missing = [name for name in ("transformers", "peft") if not importlib.util.find_spec(name)]
    if missing:
        return f"skipped: {' and '.join(missing)} not installed"
    import peft
    model = hf_model(args)
    vocab_size = model.config.vocab_size
    generation = {}
    for batch in (1, 16):
        ids = torch.tensor(random_prompts(vocab_size, batch), device=args.device)

        def run(new_tokens):
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
            if out.shape != (batch, PROMPT_LEN + new_tokens):
                raise RuntimeError(f"transformers generate returned {tuple(out.shape)}, not "
                                   f"{(batch, PROMPT_LEN + new_tokens)}")

        run(2)
        generation[batch] = batch * NEW_TOKENS / timed(lambda: run(NEW_TOKENS), args.device)
    n = matmul_params(model)
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(lorasb.DEFAULT_TARGETS),
                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    autocast = autocast_for(args)

    def logits(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    def loss_fn(batch):
        with autocast:
            return causal_lm_loss(logits, batch)

    row = training_row(model, loss_fn, args, vocab_size, 4 * n)
    del model, logits, loss_fn
    release_memory()
    return {"generation": generation, "training": row}


# ---------------------------------------------------------------------------------------------------------------------
# The report: markdown tables and the targets.
# ---------------------------------------------------------------------------------------------------------------------

METHODS = ("lorasb", "loraxs", "lora", "full", "frozen")


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def training_table(results: dict, args) -> list[str]:
    rows = results["training"]
    labels = {"lorasb": f"lorasb r={args.rank}", "loraxs": f"loraxs r={args.rank}",
              "lora": f"lora r={LORA_RANK}, alpha {LORA_ALPHA:g}", "full": "full", "frozen": "frozen (the floor)"}
    hf = results["hf"]
    if isinstance(hf, dict):
        rows = {**rows, "peft": hf["training"]}
        labels["peft"] = f"PEFT lora r={LORA_RANK}, alpha {LORA_ALPHA:g} (transformers)"
    frozen, full = (rows[m].get("step_s") for m in ("frozen", "full"))
    lines = ["| method | trainable params | step (ms) | tokens/s | peak memory (MiB) | MFU | x frozen | x full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, row in rows.items():
        if "error" in row:
            lines.append(f"| {labels[method]} | {row['error']} | | | | | | |")
            continue
        lines.append(f"| {labels[method]} | {row['trainable']:,} | {row['step_s'] * 1e3:.1f} | "
                     f"{row['tokens_per_s']:,.0f} | {row['peak_memory_bytes'] / 2**20:,.0f} | "
                     f"{fmt(row['mfu'], '.1%')} | {fmt(ratio(row['step_s'], frozen), '.2f', 'x')} | "
                     f"{fmt(ratio(row['step_s'], full), '.2f', 'x')} |")
    return lines


def init_table(results: dict, args) -> list[str]:
    init, epoch_s = results["init"], results["epoch_s"]
    parts = [(f"estimate_first_update, {init['samples']} samples in micro-batches of {args.batch}", init["estimate_s"]),
             (f"exact SVD of all {init['targets']} targets", init["svd_exact_s"]),
             (f"randomized SVD of all {init['targets']} targets", init["svd_randomized_s"]),
             ("total: estimate + exact SVD (the trainer's default)", init["estimate_s"] + init["svd_exact_s"]),
             ("total: estimate + randomized SVD (--init_svd randomized)",
              init["estimate_s"] + init["svd_randomized_s"])]
    lines = ["| initialization | seconds | share of one GSM8K epoch |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.2f} | {fmt(ratio(seconds, epoch_s), '.2%')} |" for name, seconds in parts]
    return lines


def generation_table(results: dict) -> list[str]:
    ours, hf = results["generation"], results["hf"]
    lines = ["| greedy generation | batch | tokens/s | ours / transformers |", "|---|---:|---:|---:|"]
    for batch, tokens_per_s in ours.items():
        theirs = hf["generation"][batch] if isinstance(hf, dict) else None
        lines.append(f"| model.generate (ours) | {batch} | {tokens_per_s:,.1f} | "
                     f"{fmt(ratio(tokens_per_s, theirs), '.2f', 'x')} |")
        if theirs is not None:
            lines.append(f"| transformers generate | {batch} | {theirs:,.1f} | |")
    return lines


def tokenizer_table(results: dict) -> list[str]:
    tok = results["tokenizers"]
    if isinstance(tok, str):
        return [f"Tokenizer throughput {tok}."]
    theirs = tok.get("tokenizers", {}).get("tokens_per_s")
    lines = [f"| tokenizer (GSM8K train, {tok['texts']:,} texts, one at a time) | tokens | tokens/s | "
             f"ours / tokenizers |", "|---|---:|---:|---:|"]
    for name in ("ours", "tokenizers"):
        if name in tok:
            versus = fmt(ratio(tok[name]["tokens_per_s"], theirs), ".2f", "x") if name == "ours" else ""
            lines.append(f"| {name} | {tok[name]['tokens']:,} | {tok[name]['tokens_per_s']:,.0f} | {versus} |")
    return lines


def targets(results: dict) -> list[dict]:
    """Each goal of the implementation: the ratio it is judged on, and whether it is met (None when not measured)."""
    steps = {m: row.get("step_s") for m, row in results["training"].items()}
    hf = results["hf"] if isinstance(results["hf"], dict) else None
    peft_step = hf["training"].get("step_s") if hf else None
    init = results["init"]
    goals = [("lorasb step <= 1.05 x the frozen floor", "lorasb / frozen", ratio(steps["lorasb"], steps["frozen"]),
              lambda r: r <= 1.05),
             ("lorasb step <= 0.75 x full fine-tuning", "lorasb / full", ratio(steps["lorasb"], steps["full"]),
              lambda r: r <= 0.75),
             ("lorasb step no slower than the PEFT LoRA step", "lorasb / PEFT lora", ratio(steps["lorasb"], peft_step),
              lambda r: r <= 1.0)]
    for batch, ours in results["generation"].items():
        goals.append((f"generation at batch {batch} no slower than transformers", "tokens/s ours / transformers",
                      ratio(ours, hf["generation"][batch]) if hf else None, lambda r: r >= 1.0))
    goals.append(("initialization under 2% of an epoch", "(estimate + exact SVD) / epoch",
                  ratio(init["estimate_s"] + init["svd_exact_s"], results["epoch_s"]), lambda r: r < 0.02))
    return [{"target": target, "ratio": what, "measured": value, "met": None if value is None else ok(value)}
            for target, what, value, ok in goals]


def report(results: dict, args) -> str:
    setup = results["setup"]
    lines = [f"## bench.py: {setup['model']} on {setup['device_name']}, {setup['dtype']}, batch {args.batch} x "
             f"{args.seq} tokens", "", *training_table(results, args), "", *init_table(results, args), "",
             *generation_table(results), "", *tokenizer_table(results), "",
             "| target | measured | |", "|---|---|---|"]
    for goal in results["targets"]:
        value = fmt(goal["measured"], ".2%") if "epoch" in goal["ratio"] else fmt(goal["measured"], ".2f", "x")
        result = "n/a" if goal["met"] is None else "met" if goal["met"] else "missed"
        lines.append(f"| {goal['target']} | {goal['ratio']} = {value} | {result} |")
    lines += ["", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(lines)


def notes(results: dict, args) -> list[str]:
    setup = results["setup"]
    out = [f"torch {setup['torch']}, {setup['device_name']}, {setup['cpus']} CPU cores, load average "
           f"{setup['load_average']} at start; wall time {results['wall_s']:.0f} s.",
           f"Step: forward + backward + clip_grad_norm_ + AdamW (train_gsm8k.py's step) on one batch of random token "
           f"ids, median of {args.steps} steps after {WARMUP_STEPS} warm-up steps"
           + (", CUDA-synchronized" if args.device.type == "cuda" else "")
           + ("; bf16 weights run under bf16 autocast." if args.dtype == torch.bfloat16 else "."),
           "frozen: every weight frozen, the embedding output requires grad: forward + activation gradients of every "
           "layer, no optimizer: the floor of any adapter. Adapter factors come from randomized SVDs here (their "
           "values do not change the step time).",
           f"Epoch = ceil({GSM8K_TRAIN_EXAMPLES} / {args.batch}) x the lorasb step = "
           f"{fmt(results['epoch_s'], '.1f')} s (every example {args.seq} tokens, batch {args.batch}); the SVD times "
           f"are one lorasb_factors call per distinct target shape ({results['init']['target_shapes']}) times the "
           f"number of targets of that shape.",
           "MFU = FLOPs per token x tokens/s / peak: 6N for full, 4N for adapters and the floor (forward 2N + "
           "activation gradients 2N), N = the nn.Linear weights incl. lm_head; "
           + ("peak " + fmt(peak_flops(args), '.3g') + " FLOP/s (bf16 dense)." if peak_flops(args)
              else "n/a on CPU, in fp32, or on a GPU missing from PEAK_BF16_FLOPS.")]
    if args.device.type == "cuda":
        out.append("Peak memory: torch.cuda.max_memory_allocated, reset after each model is built.")
    elif all(row.get("peak_memory_per_method", True) for row in results["training"].values()):
        out.append(f"Peak memory: the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after each model "
                   f"is built), so it includes {setup['baseline_rss_bytes'] / 2**20:,.0f} MiB of Python and torch "
                   f"measured before any model (the PEFT row also holds the imported transformers and peft).")
    else:
        out.append("Peak memory: the peak RSS since the process started (VmHWM or ru_maxrss; /proc/self/clear_refs "
                   "could not reset it): the largest figure so far, not per method.")
    if args.dtype == torch.bfloat16:
        out.append("full keeps bf16 weights, gradients and AdamW states, as train_gsm8k.py --dtype bfloat16 does.")
    if isinstance(results["hf"], str):
        out.append(f"transformers + PEFT comparison {results['hf']}.")
    else:
        out.append(f"transformers: the same {'config, random weights' if args.config else 'checkpoint'}, "
                   f"attn_implementation='sdpa', {setup['dtype']}; PEFT LoRA on the same seven targets, same step.")
    return out


def guarded(fn, *fn_args):
    """fn's result, or {"error": ...} when the device runs out of memory (the other rows still get measured)."""
    try:
        return fn(*fn_args)
    except torch.OutOfMemoryError:
        release_memory()
        return {"error": "out of memory"}


def main(argv=None) -> dict:
    args = parse_args(argv)
    config = model_lib.ModelConfig.from_hf(hf_config(args))
    limit = min(min(m.weight.shape) for m in lorasb.find_targets(model_lib.build_model(config)).values())
    if max(args.rank, LORA_RANK) > limit:
        raise ValueError(f"the smallest target layer of this model allows rank <= {limit}: lower --rank "
                         f"(LoRA uses r={LORA_RANK}, so this model is too small for the comparison)")
    start = time.perf_counter()
    results = {"setup": {
        "model": f"--config {args.config} (random weights)" if args.config else str(args.model),
        "device_name": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()})",
        "dtype": str(args.dtype).removeprefix("torch."), "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "rank": args.rank, "torch": torch.__version__, "cpus": os.cpu_count(),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "baseline_rss_bytes": proc_status_bytes("VmRSS")}}

    def log(what):
        print(f"bench: {what} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    log("initialization")
    results["init"] = bench_init(args)
    results["training"] = {}
    for method in METHODS:
        log(f"training step: {method}")
        results["training"][method] = guarded(bench_training, args, method)
    lorasb_step = results["training"]["lorasb"].get("step_s")
    results["epoch_s"] = math.ceil(GSM8K_TRAIN_EXAMPLES / args.batch) * lorasb_step if lorasb_step else None
    log("generation")
    results["generation"] = bench_generation(args)
    log("transformers + PEFT")
    results["hf"] = guarded(bench_hf, args)
    if "error" in results["hf"]:
        results["hf"] = f"failed: {results['hf']['error']}"
    log("tokenizers")
    results["tokenizers"] = bench_tokenizers(args)
    results["wall_s"] = time.perf_counter() - start
    results["notes"] = notes(results, args)
    results["targets"] = targets(results)
    print(report(results, args), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
