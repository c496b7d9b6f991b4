"""Speed and memory of LoRA-SB beside LoRA-XS, LoRA, full fine-tuning and the frozen floor, and beside transformers +
PEFT, printed as markdown.

The SmolLM2-135M checkpoint (env LORASB_SMOLLM2_DIR, default ~/.cache/lorasb-dev/SmolLM2-135M-Instruct), on CPU or GPU:
    python experiments/bench.py
Any local Hugging Face model folder:
    python experiments/bench.py --model path/to/model --device cuda
Random weights with the shapes of a real model (no download; speed and memory do not depend on weight values):
    python experiments/bench.py --config mistral-7b --device cuda --batch 4 --seq 512 --json out/mistral-7b.json

How it measures:
  - Training step: train_gsm8k.train_step (forward + backward + clip_grad_norm_ + AdamW) on one fixed batch of random
    token ids, for lorasb and loraxs (rank --rank), lora (r=32, alpha 64), full, frozen and PEFT LoRA (when
    transformers and peft are installed). Every method has its own model, built once and kept; after --warmup steps
    each, --rounds rounds run one step of every method in turn, the order reversed every other round, so that whatever
    slows the machine slows every method alike. CUDA timings are synchronized; bf16 weights run under bf16 autocast.
  - Every time is the median over rounds with its interquartile range [Q1-Q3]; a ratio of two methods is the median of
    the per-round ratios (both measured within the same round).
  - Noise gauge: lorasb / loraxs, whose layers have the same shapes and do the same work.
  - frozen: every weight frozen, the embedding output requiring grad: forward + the activation gradients of every
    layer. A method's FLOP-adjusted floor is frozen's step x the method's FLOPs / frozen's FLOPs (step_flops).
  - Peak memory: one method at a time on a fresh model, before the timed rounds.
  - --quantize nf4: the training rounds time the adapter methods and frozen on the base and on the same weights in NF4
    (machinery/nf4.quantize_model: every linear layer but lm_head), in the same rounds; the ratio NF4 / unquantized of
    each method is the median of its per-round ratios. Full fine-tuning and PEFT are left out (nothing of NF4 there).
  - Initialization: --init_rounds rounds of (estimate_first_update, the exact SVDs, the randomized SVDs).
  - Generation: model.generate and transformers' generate, interleaved, --gen_rounds rounds at batch 1 and 16.
  - The machine: load averages at start and end, and the CPU other processes used in each phase (Linux's /proc/stat),
    with a warning when they used more than a tenth of the cores.
"""

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

if __package__ in (None, ""):  # run as a file (python experiments/bench.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import lorasb  # noqa: E402
import model as model_lib  # noqa: E402
import train_gsm8k  # noqa: E402
from machinery import nf4, reporting  # noqa: E402
from machinery.tokenizer import Tokenizer  # noqa: E402

DEFAULT_MODEL_DIR = os.environ.get("LORASB_SMOLLM2_DIR",
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
TIMED_METHODS = (*lorasb.METHODS, "full", "frozen")  # the rows of the tables, + "peft" with transformers and peft
NF4_METHODS = (*lorasb.METHODS, "frozen")  # timed on both bases with --quantize nf4 (as "<method> nf4" on the NF4 one)
LORA_RANK, LORA_ALPHA = 32, 64.0  # the paper's LoRA baseline
GSM8K_TRAIN_EXAMPLES = 7473
PROMPT_LEN, NEW_TOKENS = 64, 64
TOKENIZER_CHUNKS = 10
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 tensor-core peaks (datasheets)
DEFAULTS = {"cpu": dict(batch=2, seq=128, rounds=10, gen_rounds=5, init_rounds=3),
            "cuda": dict(batch=8, seq=512, rounds=30, gen_rounds=5, init_rounds=3)}
PHASES = ("init", "memory", "training", "generation", "tokenizers")
OTHERS_WARN = 0.1  # share of the cores that other processes may use during a timed phase before the run is noisy
LOAD_CHANGE_WARN = 0.5  # without /proc/stat: the change of the load average per core (own share removed) that warns


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help=f"local Hugging Face model folder (default: {DEFAULT_MODEL_DIR})")
    a("--config", default=None, help=f"instead of --model, random weights of these shapes: {', '.join(CONFIGS)}")
    a("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    a("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on GPU, fp32 on CPU)")
    a("--batch", type=int, default=None, help="examples per step, also the micro batch of the estimate "
      "(default: 2 on CPU, 8 on GPU)")
    a("--seq", type=int, default=None, help="tokens per example (default: 128 on CPU, 512 on GPU)")
    a("--rounds", type=int, default=None, help="timed rounds of one training step per method (default: 10 on CPU, "
      "30 on GPU)")
    a("--warmup", type=int, default=2, help="untimed steps per method before the rounds")
    a("--gen_rounds", type=int, default=None, help="timed rounds of generation, after one untimed (default: 5)")
    a("--init_rounds", type=int, default=None, help="timed rounds of the initialization (default: 3)")
    a("--rank", type=int, default=96, help="rank of lorasb and loraxs (LoRA uses r=32, alpha 64)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a("--compile_decode", action="store_true", help="also time model.generate(compile_decode=True) (compiling "
      "takes minutes on a CPU)")
    a("--phases", default=",".join(PHASES), help=f"what to measure, comma-separated (default: {','.join(PHASES)})")
    a("--json", default=None, help="also write every figure, and every round's time, to this JSON file")
    a("--quantize", default="none", choices=("none", "nf4"), help="nf4: the training phase times the adapter methods "
      "and frozen on the base and on the same weights in NF4, for the step-time ratio NF4 / unquantized")
    args = p.parse_args(argv)
    problems = []
    if args.model and args.config:
        problems.append("pass --model or --config, not both")
    if args.config and args.config not in CONFIGS:
        problems.append(f"--config {args.config!r}: choose one of {', '.join(CONFIGS)}")
    if not args.config:
        args.model = args.model or DEFAULT_MODEL_DIR
        if not (Path(args.model) / "config.json").is_file():
            raise FileNotFoundError(f"--model {args.model}: no config.json there; pass a local model folder (set "
                                    f"LORASB_SMOLLM2_DIR for the default), or --config NAME for random weights")
    if args.dtype not in (None, "bfloat16", "float32"):
        problems.append(f"--dtype {args.dtype!r}: choose bfloat16 or float32")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name, value in DEFAULTS["cuda" if args.device.type == "cuda" else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    problems += [f"--{name} must be positive, got {getattr(args, name)}"
                 for name in ("batch", "seq", "rounds", "gen_rounds", "init_rounds", "rank") if getattr(args, name) < 1]
    args.phases = [phase.strip() for phase in args.phases.split(",") if phase.strip()]
    problems += [f"--phases: unknown phase {phase!r}; choose from {', '.join(PHASES)}" for phase in args.phases
                 if phase not in PHASES]
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        problems.append("--warmup must be >= 0 and --threads >= 1")
    if problems:
        raise ValueError("bench.py: " + "; ".join(problems))
    args.dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Timing, statistics and the machine's load.
# ---------------------------------------------------------------------------------------------------------------------

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


def spread(values: list[float]) -> dict:
    """Median and interquartile range (Q1, Q3; inclusive quartiles, so within the values) of a list of samples."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "n": len(values)}


def paired(numerators: list[float], denominators: list[float], factor: float = 1.0) -> dict:
    """spread of the per-round ratios numerator / (factor x denominator)."""
    return spread([a / (factor * b) for a, b in zip(numerators, denominators)])


class Machine:
    """Marks of (wall clock, this process's CPU seconds, the busy CPU seconds of every process) taken along the run,
    to tell how much CPU other processes used in each phase; Linux's /proc/stat (None elsewhere)."""

    def __init__(self):
        self.cpus = os.cpu_count() or 1
        self.load_start = os.getloadavg()
        self.marks: list[tuple[float, float, float | None]] = []
        self.phases: dict[str, dict] = {}
        self.mark()

    @staticmethod
    def busy_seconds() -> float | None:
        """CPU seconds all processes spent busy since boot: user + nice + system + irq + softirq + steal."""
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _, _, irq, softirq, steal = (int(f) for f in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def mark(self) -> None:
        own = os.times()
        self.marks.append((time.perf_counter(), own.user + own.system, self.busy_seconds()))

    @staticmethod
    def cores(start, end) -> tuple[float, float | None]:
        """(this process's busy cores, other processes' busy cores) on average between two marks."""
        wall = max(end[0] - start[0], 1e-9)
        own = (end[1] - start[1]) / wall
        short = wall < 1.0  # /proc/stat counts in clock ticks (10 ms): too coarse for less
        others = None if start[2] is None or end[2] is None or short else max(0.0, (end[2] - start[2]) / wall - own)
        return own, others

    @contextmanager
    def phase(self, name: str):
        self.mark()
        start = self.marks[-1]
        yield
        self.mark()
        own, others = self.cores(start, self.marks[-1])
        self.phases[name] = {"seconds": self.marks[-1][0] - start[0], "own_cores": own, "other_cores": others}

    def own_load(self) -> float:
        """This process's share of the 1-minute load average now: the load average is an exponential average with a
        60 s time constant, taken here over this process's busy cores between successive marks."""
        load = 0.0
        for start, end in zip(self.marks, self.marks[1:]):
            decay = math.exp(-(end[0] - start[0]) / 60)
            load = load * decay + self.cores(start, end)[0] * (1 - decay)
        return load

    def finish(self) -> dict:
        """Load averages at start and end, the other processes' CPU per phase, and the warnings they call for.

        The warnings come from the other processes' CPU, measured: the 1-minute load average lags by about a minute
        (a job that ended just before the start still shows), so its change from start to end (this process's own
        share, own_load, removed) only warns where /proc/stat is missing."""
        self.mark()
        own_recent = self.own_load()
        load_end = os.getloadavg()
        change = (load_end[0] - own_recent - self.load_start[0]) / self.cpus
        warnings = []
        for name, phase in self.phases.items():
            if phase["other_cores"] is not None and phase["other_cores"] / self.cpus > OTHERS_WARN:
                warnings.append(f"other processes used {phase['other_cores']:.2f} of {self.cpus} cores during "
                                f"{name}")
        if self.marks[0][2] is None and abs(change) > LOAD_CHANGE_WARN:
            warnings.append(f"the 1-minute load changed by {change * self.cpus:+.1f} ({change:+.2f} per core) from "
                            f"start to end, this process's own {own_recent:.1f} removed")
        return {"cpus": self.cpus, "load_start": list(self.load_start), "load_end": list(load_end),
                "own_load": own_recent, "load_change_per_core": change, "phases": self.phases, "warnings": warnings}


def interleaved(runs: dict[str, Callable[[], None]], rounds: int, warmup: int, device, machine: Machine,
                log: Callable[[str], None] = lambda what: None, optional=()) -> dict[str, list[float] | str]:
    """Seconds of every run: `warmup` untimed rounds, then `rounds` timed rounds, each calling every run once in turn,
    in reverse order every other round (so no run always follows the same one). A run that runs out of memory, or an
    `optional` one that fails, is dropped from the next rounds; its entry becomes the reason."""
    times: dict[str, list[float] | str] = {name: [] for name in runs}
    for i in range(warmup + rounds):
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            if isinstance(times[name], str):
                continue
            try:
                seconds = timed(runs[name], device)
            except torch.OutOfMemoryError:
                times[name] = "out of memory"
                release_memory()
                continue
            except Exception as e:
                if name not in optional:
                    raise
                times[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
                continue
            if i >= warmup:
                times[name].append(seconds)
        machine.mark()
        log(f"round {i + 1 - warmup} of {rounds}" if i >= warmup else f"warm-up {i + 1} of {warmup}")
    return times


# ---------------------------------------------------------------------------------------------------------------------
# Models, batches and memory.
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
    """A new copy of the benchmarked model."""
    torch.manual_seed(0)
    if args.config:
        return random_model(model_lib.ModelConfig.from_hf(CONFIGS[args.config]), args.device, args.dtype)
    return model_lib.load_model(args.model, device=args.device, dtype=args.dtype)


def twin(model: model_lib.Transformer) -> model_lib.Transformer:
    """A second model on the same weight tensors (nothing copied), for a method that never changes the base weights:
    the adapter methods and frozen share one set of weights, so that all methods fit in memory at once. The twin of an
    NF4 model (nf4_base) has the NF4 layers too, on the same codes."""
    other = nf4.build_nf4_model(model.config, "meta") if nf4.nf4_layers(model) else model_lib.build_model(model.config)
    other.load_state_dict(model.state_dict(), assign=True)
    if model.config.tie_word_embeddings:
        other.lm_head.weight = other.model.embed_tokens.weight
    other.inv_freq = model.inv_freq  # not in the state dict
    return other.eval()


def nf4_base(model: model_lib.Transformer) -> model_lib.Transformer:
    """A twin of the model with its linear layers but lm_head quantized to NF4 (the model itself is unchanged)."""
    quantized = twin(model)
    nf4.quantize_model(quantized)
    return quantized


def random_batch(vocab_size: int, batch: int, seq: int, device, seed: int = 0) -> dict:
    """A training batch of random token ids (B, T), every position labelled, no padding (the trainer's dict)."""
    ids = torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, dtype=torch.bool, device=device),
            "labels": ids.to(device)}


def trainer_plan() -> train_gsm8k.Plan:
    """The plan of train_gsm8k.py's default run on GSM8K: its lr_1 and its number of estimate samples."""
    return train_gsm8k.plan_training(train_gsm8k.parse_args([]), GSM8K_TRAIN_EXAMPLES, 1)


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


def release_memory() -> None:
    """Return what the caller just deleted to the device, so the next measurement starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_flops(args) -> float | None:
    """The GPU's dense bf16 peak from PEAK_BF16_FLOPS; None on CPU, in fp32, or for a GPU not in the table."""
    if args.device.type != "cuda" or args.dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(args.device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs and the training step of each method.
# ---------------------------------------------------------------------------------------------------------------------

def step_flops(config: model_lib.ModelConfig, method: str, seq: int, rank: int) -> float:
    """FLOPs per token of one training step of `method` (a multiply-add is 2 FLOPs); elementwise work is not counted.

    frozen (the floor): 4N + 6 T d_q L. N = the weights of every nn.Linear, lm_head included (a tied embedding costs
      nothing as a lookup, 2 FLOPs per weight as lm_head); forward 2N, activation gradients 2N. Causal attention per
      layer: forward 2 T d_q (q k^T and p v over T/2 keys on average, d_q = heads x head_dim, T = seq), backward twice
      that; L layers.
    full: frozen + 2N, the weight gradients.
    lorasb, loraxs: frozen + per target layer (W0 m x n; B m x r, R r x r, A r x n, R trains)
      forward 2r(n + r + m): h = x A^T, g = h R^T, g B^T;
      backward 2r(m + 2r + n): dg = dy B, dR = dg^T h, dh = dg R, dx += dh A;
      that is 4r(m + n) + 6r^2 in all.
    lora, peft: frozen + per target layer (B m x r, A r x n, both train)
      forward 2r(n + m): h = x A^T, h B^T; backward 4r(n + m): dh = dy B, dB = dy^T h, dA = dh^T x, dx += dh A;
      6r(m + n) in all.
    Below layer 0 no activation gradient is needed when only adapters train; this count ignores that (< 1/L of the
    frozen step), so the floor it gives an adapter is slightly high."""
    skeleton = model_lib.build_model(config)  # on "meta": shapes only
    n = sum(m.weight.numel() for m in skeleton.modules() if isinstance(m, torch.nn.Linear))
    flops = 4 * n + 6 * seq * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    shapes = [m.weight.shape for m in lorasb.find_targets(skeleton).values()]
    if method == "full":
        flops += 2 * n
    elif method in ("lorasb", "loraxs"):
        flops += sum(4 * rank * (m + k) + 6 * rank ** 2 for m, k in shapes)
    elif method in ("lora", "peft"):
        flops += sum(6 * LORA_RANK * (m + k) for m, k in shapes)
    elif method != "frozen":
        raise ValueError(f"unknown method {method!r}")
    return float(flops)


def random_updates(model: torch.nn.Module, lr: float) -> dict[str, torch.Tensor]:
    """An `updates` dict of the right shapes for add_adapters("lorasb"): -lr * sign(noise), fp32, on the model's
    device (the values change what B, R, A hold, not how fast they run)."""
    return {name: lorasb.adamw_first_step(torch.randn(lorasb.layer_shape(m), device=m.weight.device), lr)
            for name, m in lorasb.find_targets(model).items()}


def prepare(model: model_lib.Transformer, method: str, rank: int) -> None:
    """Turn a model into what `method` trains. Adapter SVDs are randomized here (the factors' values do not change the
    step time; the exact SVD is timed in bench_init)."""
    if method == "lorasb":
        lorasb.add_adapters(model, "lorasb", rank, updates=random_updates(model, 1e-4), svd="randomized")
    elif method == "loraxs":
        lorasb.add_adapters(model, "loraxs", rank, svd="randomized")
    elif method == "lora":
        lorasb.add_adapters(model, "lora", LORA_RANK, lora_alpha=LORA_ALPHA)
    elif method == "frozen":  # no weight trains, but backward still runs through every layer down to the embedding
        for p in model.parameters():
            p.requires_grad_(False)
        model.model.embed_tokens.register_forward_hook(lambda module, inputs, output: output.requires_grad_())
    elif method != "full":
        raise ValueError(f"unknown method {method!r}")


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


def hf_available() -> list[str]:
    """The missing ones of transformers and peft (empty when both are installed)."""
    return [name for name in ("transformers", "peft") if not importlib.util.find_spec(name)]


def method_step(args, method: str, base: model_lib.Transformer | None = None) -> dict:
    """The model of `method` and its training step: {"step": callable, "trainable": count, "model": the model}.
    Adapter methods and frozen run on twin(base) when a base is given, else on a fresh model; peft on transformers.
    The step is the trainer's train_step (its default lr, weight decay and clipping) on one fixed batch; frozen has no
    trainable parameter, so its step is the forward and backward alone."""
    if method == "peft":
        import peft
        config = peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(lorasb.DEFAULT_TARGETS),
                                 lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = peft.get_peft_model(hf_model(args), config)
        forward = lambda input_ids, attention_mask: model(input_ids=input_ids, attention_mask=attention_mask).logits
    else:
        model = twin(base) if base is not None and method != "full" else fresh_model(args)
        prepare(model, method, args.rank)
        forward = model
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = random_batch(model.config.vocab_size, args.batch, args.seq, "cpu")  # moved per step, as data.Batches'
    setup = train_gsm8k.Setup.one_process(args.device, args.dtype)  # bf16 under autocast, as the trainer trains
    if trainable:
        defaults = train_gsm8k.parse_args([])
        optimizer = train_gsm8k.make_optimizer(model, defaults, args.device)
        plan = train_gsm8k.Plan(grad_accum=1, total_steps=1, warmup_steps=1, lr_1=defaults.lr, num_init_samples=None)
        batches = SimpleNamespace(next_batch=lambda: batch)

        def step():
            train_gsm8k.train_step(forward, optimizer, batches, 1, defaults, plan, setup)
    else:
        def step():
            with setup.autocast():
                loss = train_gsm8k.causal_lm_loss(forward, train_gsm8k.to_device(batch, args.device))
            loss.backward()

    return {"step": step, "trainable": trainable, "model": model}


def training_methods() -> list[str]:
    return [*TIMED_METHODS, *([] if hf_available() else ["peft"])]


def bench_memory(args, method: str) -> dict:
    """Peak memory of `method` alone: a fresh model, two steps (the second with the optimizer's states in place)."""
    run = method_step(args, method)
    resettable = reset_peak_memory(args.device)
    for _ in range(2):
        run["step"]()
    synchronize(args.device)
    row = {"peak_memory_bytes": reporting.peak_memory_bytes(args.device), "peak_memory_per_method": resettable,
           "trainable": run["trainable"]}
    del run
    release_memory()
    return row


def bench_training(args, machine: Machine, log) -> dict:
    """Every method's model built once (adapters and frozen on one shared set of weights), then the interleaved rounds;
    per method the step's spread, its FLOPs, its FLOP-adjusted floor and its ratios to the floor, frozen and full."""
    base, runs, trainable = fresh_model(args), {}, {}
    bases = {"": base} if args.quantize == "none" else {"": base, " nf4": nf4_base(base)}
    for suffix, weights in bases.items():
        for method in training_methods() if args.quantize == "none" else NF4_METHODS:
            log(f"building {method}{suffix}")
            try:
                built = method_step(args, method, weights)
                runs[method + suffix], trainable[method + suffix] = built["step"], built["trainable"]
                del built
            except torch.OutOfMemoryError:
                runs[method + suffix] = None
                release_memory()
    del base, bases  # their weights live on in the twins
    times = interleaved({m: step for m, step in runs.items() if step is not None}, args.rounds, args.warmup,
                        args.device, machine, log)
    times.update({m: "out of memory" for m, step in runs.items() if step is None})
    names = list(runs)
    del runs
    release_memory()
    config = model_lib.ModelConfig.from_hf(hf_config(args))
    tokens, peak = args.batch * args.seq, peak_flops(args)
    rows = {}
    for name, t in ((name, times[name]) for name in names):
        method, _, quantized = name.partition(" ")  # "lorasb", or "lorasb nf4" on the NF4 base
        if isinstance(t, str):
            rows[name] = {"error": t}
            continue
        step, flops = spread(t), step_flops(config, method, args.seq, args.rank)
        row = {"step_s": step, "times_s": t, "trainable": trainable[name], "flops_per_token": flops,
               "tokens_per_s": tokens / step["median"], "mfu": flops * tokens / step["median"] / peak if peak else None}
        frozen = "frozen" + (" " + quantized if quantized else "")  # the floor on the same base
        for key, other in (("x_frozen", frozen), ("x_full", "full"), ("x_unquantized", method if quantized else "")):
            if isinstance(times.get(other), list):
                row[key] = paired(t, times[other])
        if isinstance(times.get(frozen), list):
            factor = flops / step_flops(config, "frozen", args.seq, args.rank)
            row["floor_s"] = {k: v * factor if k != "n" else v for k, v in spread(times[frozen]).items()}
            row["x_floor"] = paired(t, times[frozen], factor)
        rows[name] = row
    gauge = (paired(times["lorasb"], times["loraxs"])
             if not any(isinstance(times[m], str) for m in ("lorasb", "loraxs")) else None)
    return {"rows": rows, "gauge": gauge}


# ---------------------------------------------------------------------------------------------------------------------
# Initialization: the first-update estimate and the SVDs.
# ---------------------------------------------------------------------------------------------------------------------

def bench_init(args, machine: Machine, log) -> dict:
    """--init_rounds rounds of: estimate_first_update on the trainer's default number of examples (micro batch
    --batch) with its lr_1, the exact SVDs of all targets, their randomized SVDs. lorasb_factors is timed once per
    distinct target shape and multiplied by the number of targets of that shape (an SVD's time depends on its shape; a
    7B model has 224 targets of 4 shapes)."""
    model, setup, plan = fresh_model(args), train_gsm8k.Setup.one_process(args.device, args.dtype), trainer_plan()
    batches = [random_batch(model.config.vocab_size, args.batch, args.seq, args.device, seed=1 + i)
               for i in range(math.ceil(plan.num_init_samples / args.batch))]

    def loss_fn(m, batch):
        with setup.autocast():
            return train_gsm8k.causal_lm_loss(m, batch)

    examples, shapes = {}, Counter(tuple(m.weight.shape) for m in lorasb.find_targets(model).values())

    def estimate():
        updates = lorasb.estimate_first_update(model, batches, loss_fn, plan.num_init_samples, plan.lr_1)
        examples.update({tuple(u.shape): u for u in updates.values()})  # one update per shape, for the SVDs

    lorasb.lorasb_factors(torch.randn(64, 64, device=args.device), 8)  # load the solver libraries before timing
    rounds = {"estimate_s": [], "svd_exact_s": [], "svd_randomized_s": []}
    for i in range(args.init_rounds):
        rounds["estimate_s"].append(timed(estimate, args.device))
        # the time of all targets: each shape's SVD time x its count (timed per shape, in turn)
        for key, svd in (("svd_exact_s", "exact"), ("svd_randomized_s", "randomized")):
            rounds[key].append(sum(count * timed(lambda: lorasb.lorasb_factors(examples[shape], args.rank,
                                                                               svd=svd), args.device)
                                   for shape, count in shapes.items()))
        machine.mark()
        log(f"initialization round {i + 1} of {args.init_rounds}")
    totals = {"total_exact_s": [a + b for a, b in zip(rounds["estimate_s"], rounds["svd_exact_s"])],
              "total_randomized_s": [a + b for a, b in zip(rounds["estimate_s"], rounds["svd_randomized_s"])]}
    return {"samples": plan.num_init_samples, "targets": sum(shapes.values()), "target_shapes": len(shapes),
            **{key: spread(values) for key, values in {**rounds, **totals}.items()}, "times_s": rounds}


# ---------------------------------------------------------------------------------------------------------------------
# Generation and tokenizers.
# ---------------------------------------------------------------------------------------------------------------------

def random_prompts(vocab_size: int, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, vocab_size, (batch, PROMPT_LEN), generator=g).tolist()


def bench_generation(args, machine: Machine, log) -> dict:
    """Greedy tokens/s at batch 1 and 16 of model.generate (and with compile_decode, under --compile_decode) and of
    transformers' generate, interleaved: PROMPT_LEN-token prompts (equal lengths, so no padding), NEW_TOKENS new tokens
    each (no EOS stop), one untimed round first (it compiles, with --compile_decode)."""
    ours = fresh_model(args)
    theirs = None if hf_available() else hf_model(args)
    runs = {}
    for batch in (1, 16):
        prompts = random_prompts(ours.config.vocab_size, batch)
        ids = torch.tensor(prompts, device=args.device)
        for compiled in (False, True) if args.compile_decode else (False,):
            def run(prompts=prompts, compiled=compiled):
                out = model_lib.generate(ours, prompts, NEW_TOKENS, eos_ids=set(), pad_id=0, batch_size=len(prompts),
                                         compile_decode=compiled)
                if any(len(o) != NEW_TOKENS for o in out):
                    raise RuntimeError(f"model.generate returned {[len(o) for o in out]} tokens, not {NEW_TOKENS}")
            runs[f"{'compiled' if compiled else 'ours'} {batch}"] = run
        if theirs is not None:
            def run_hf(ids=ids):
                with torch.inference_mode():
                    out = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                          do_sample=False, eos_token_id=None, pad_token_id=0)
                if out.shape != (ids.shape[0], PROMPT_LEN + NEW_TOKENS):
                    raise RuntimeError(f"transformers generate returned {tuple(out.shape)}")
            runs[f"transformers {batch}"] = run_hf
    times = interleaved(runs, args.gen_rounds, 1, args.device, machine, log,
                        optional={name for name in runs if name.startswith("compiled")})
    result = {}
    for name, t in times.items():
        kind, batch = name.split()
        row = {"times_s": t} if not isinstance(t, str) else {"error": t}
        if not isinstance(t, str):
            row["tokens_per_s"] = spread([int(batch) * NEW_TOKENS / s for s in t])
            if kind != "transformers" and not isinstance(times.get(f"transformers {batch}", "n/a"), str):
                row["x_transformers"] = paired(times[f"transformers {batch}"], t)  # a speed ratio: their time / ours
        result.setdefault(kind, {})[int(batch)] = row
    return result


def bench_tokenizers(args, machine: Machine) -> dict | str:
    """Tokens/s encoding every GSM8K train question and answer, one text at a time, with our Tokenizer and with
    `tokenizers` (when installed), in TOKENIZER_CHUNKS chunks, interleaved chunk by chunk; a note (str) when GSM8K or
    the tokenizer is not there."""
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
        hf_tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        encoders["tokenizers"] = lambda text: hf_tokenizer.encode(text).ids
    size = math.ceil(len(texts) / TOKENIZER_CHUNKS)
    chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
    rates, tokens = {name: [] for name in encoders}, dict.fromkeys(encoders, 0)
    for i, chunk in enumerate(chunks):
        for name in (list(encoders) if i % 2 == 0 else list(encoders)[::-1]):
            t0 = time.perf_counter()
            count = sum(len(encoders[name](text)) for text in chunk)
            rates[name].append(count / (time.perf_counter() - t0))
            tokens[name] += count
        machine.mark()
    result = {"texts": len(texts), "chunks": len(chunks)}
    for name in encoders:
        result[name] = {"tokens": tokens[name], "tokens_per_s": spread(rates[name])}
    if "tokenizers" in encoders:
        result["ours"]["x_tokenizers"] = paired(rates["ours"], rates["tokenizers"])
    return result


# ---------------------------------------------------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------------------------------------------------

def fmt(s: dict | None, scale: float = 1.0, spec: str = ".0f", suffix: str = "") -> str:
    """'median [Q1-Q3]' of a spread, each value x scale; n/a for None."""
    if s is None:
        return "n/a"
    return f"{s['median'] * scale:{spec}}{suffix} [{s['q1'] * scale:{spec}}-{s['q3'] * scale:{spec}}]"


def labels(rank: int) -> dict[str, str]:
    names = {"lorasb": f"lorasb r={rank}", "loraxs": f"loraxs r={rank}",
             "lora": f"lora r={LORA_RANK}, alpha {LORA_ALPHA:g}", "full": "full", "frozen": "frozen (the floor)",
             "peft": f"PEFT lora r={LORA_RANK}, alpha {LORA_ALPHA:g} (transformers)"}
    return names | {f"{method} nf4": f"{names[method]}, NF4 base" for method in NF4_METHODS}


def training_table(results: dict, args) -> list[str]:
    rows, memory, names = results.get("training", {}).get("rows", {}), results.get("memory", {}), labels(args.rank)
    lines = ["| method | trainable params | step ms | FLOP-adjusted floor ms | x floor | x frozen | x full | "
             "tokens/s | peak memory MiB | MFU |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in rows or memory:
        row, mem = rows.get(method, {}), memory.get(method, {})
        mem_text = f"{mem['peak_memory_bytes'] / 2**20:,.0f}" if "peak_memory_bytes" in mem else mem.get("error", "")
        if "step_s" not in row:
            trainable = f"{mem['trainable']:,}" if "trainable" in mem else ""
            lines.append(f"| {names[method]} | {trainable} | {row.get('error', 'n/a')} | | | | | | {mem_text} | |")
            continue
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        lines.append(f"| {names[method]} | {row['trainable']:,} | {fmt(row['step_s'], 1e3)} | "
                     f"{fmt(row.get('floor_s'), 1e3)} | {fmt(row.get('x_floor'), spec='.2f')} | "
                     f"{fmt(row.get('x_frozen'), spec='.2f')} | {fmt(row.get('x_full'), spec='.2f')} | "
                     f"{row['tokens_per_s']:,.0f} | {mem_text} | {mfu} |")
    return lines


def nf4_table(results: dict, args) -> list[str]:
    """The NF4 base against the unquantized one, per method: the step on each and their per-round ratio."""
    rows, names, dtype = results["training"]["rows"], labels(args.rank), str(args.dtype).removeprefix("torch.")
    step = lambda row: fmt(row["step_s"], 1e3) if "step_s" in row else row.get("error", "n/a")  # noqa: E731
    lines = [f"| method | step ms, NF4 base | step ms, {dtype} base | NF4 / {dtype} |", "|---|---:|---:|---:|"]
    for method in NF4_METHODS:
        quantized, plain = rows.get(f"{method} nf4", {}), rows.get(method, {})
        lines.append(f"| {names[method]} | {step(quantized)} | {step(plain)} | "
                     f"{fmt(quantized.get('x_unquantized'), spec='.2f')} |")
    return lines


def init_table(results: dict, args) -> list[str]:
    init, epoch_s = results["init"], results["epoch_s"]
    parts = [(f"estimate_first_update, {init['samples']} samples in micro-batches of {args.batch}", "estimate_s"),
             (f"exact SVD of all {init['targets']} targets", "svd_exact_s"),
             (f"randomized SVD of all {init['targets']} targets", "svd_randomized_s"),
             ("total: estimate + exact SVD (the trainer's default)", "total_exact_s"),
             ("total: estimate + randomized SVD (--init_svd randomized)", "total_randomized_s")]
    lines = [f"| initialization ({args.init_rounds} rounds) | seconds | share of one GSM8K epoch |", "|---|---:|---:|"]
    for name, key in parts:
        share = fmt(init[key], 100 / epoch_s, ".2f", "%") if epoch_s else "n/a"
        lines.append(f"| {name} | {fmt(init[key], spec='.2f')} | {share} |")
    return lines


def generation_table(results: dict, args) -> list[str]:
    names = {"ours": "model.generate (ours)", "compiled": "model.generate(compile_decode=True)",
             "transformers": "transformers generate"}
    lines = ["| greedy generation | batch | tokens/s | speed vs transformers |", "|---|---:|---:|---:|"]
    for kind, by_batch in results["generation"].items():
        for batch, row in by_batch.items():
            if "error" in row:
                lines.append(f"| {names[kind]} | {batch} | {row['error']} | |")
                continue
            versus = fmt(row["x_transformers"], spec=".2f", suffix="x") if "x_transformers" in row else ""
            lines.append(f"| {names[kind]} | {batch} | {fmt(row['tokens_per_s'], spec=',.1f')} | {versus} |")
    return lines


def tokenizer_table(results: dict, args) -> list[str]:
    tok = results["tokenizers"]
    if isinstance(tok, str):
        return [f"Tokenizer throughput {tok}."]
    lines = [f"| tokenizer (GSM8K train, {tok['texts']:,} texts one at a time, {tok['chunks']} chunks) | tokens | "
             f"tokens/s | ours / tokenizers |", "|---|---:|---:|---:|"]
    for name in ("ours", "tokenizers"):
        if name in tok:
            versus = fmt(tok[name].get("x_tokenizers"), spec=".2f", suffix="x") if name == "ours" else ""
            lines.append(f"| {name} | {tok[name]['tokens']:,} | {fmt(tok[name]['tokens_per_s'], spec=',.0f')} | "
                         f"{versus} |")
    return lines


def machine_lines(results: dict) -> list[str]:
    machine = results["machine"]
    load = lambda values: " ".join(f"{v:.2f}" for v in values)
    others = ", ".join(f"{name} {phase['other_cores']:.2f}" for name, phase in machine["phases"].items()
                       if phase["other_cores"] is not None)
    lines = [f"Machine: {machine['cpus']} cores; load average (1, 5, 15 min) {load(machine['load_start'])} at start, "
             f"{load(machine['load_end'])} at end (about {machine['own_load']:.1f} of it this process's own: a change "
             f"of {machine['load_change_per_core']:+.2f} per core)"
             + (f"; cores used by other processes: {others}." if others else ".")]
    lines += [f"**WARNING: {w}: the figures are noisy.**" for w in machine["warnings"]]
    return lines


def notes(results: dict, args) -> list[str]:
    """Short facts on how this run measured, for the phases it ran."""
    setup = results["setup"]
    out = [f"torch {setup['torch']}, {setup['device_name']}, {setup['threads']} torch threads; phases "
           f"{', '.join(args.phases)}; wall time {results['wall_s']:.0f} s."]
    if "training" in results:
        out += [f"Step: forward + backward + clip_grad_norm_ + AdamW on one batch of random token ids; each method has "
                f"its own model (adapters and frozen share the base weights); {args.warmup} warm-up steps each, then "
                f"{args.rounds} rounds of one step per method in turn, the order reversed every other round"
                + (", CUDA-synchronized" if args.device.type == "cuda" else "")
                + ("; bf16 weights under bf16 autocast." if args.dtype == torch.bfloat16 else "."),
                "Figures: median [interquartile range] over rounds; ratios (x floor, x frozen, x full, the gauge, vs "
                "transformers) are medians of per-round ratios.",
                "frozen: every weight frozen, the embedding output requires grad (forward + activation gradients, no "
                "optimizer). FLOP-adjusted floor = frozen's step x the method's FLOPs / frozen's (bench.step_flops: "
                "4N + attention; + 2N for full; + 4r(m+n) + 6r^2 per target for lorasb/loraxs; + 6r(m+n) for "
                "lora/PEFT).",
                *(["NF4: the same weights with every linear layer but lm_head in NF4 (dequantized at each use, in "
                   "the compute dtype), timed in the same rounds; on it, x frozen and the floor are against frozen on "
                   "NF4; NF4 / unquantized is the median of the per-round ratios of the same method."]
                  if args.quantize == "nf4" else []),
                "MFU = FLOPs per token x tokens/s / peak, "
                + (f"peak {peak_flops(args):.3g} FLOP/s (bf16 dense)." if peak_flops(args)
                   else "n/a on CPU, in fp32, or on a GPU missing from PEAK_BF16_FLOPS.")]
    if "init" in results:
        out.append(f"Initialization: {args.init_rounds} rounds; epoch = ceil({GSM8K_TRAIN_EXAMPLES} / {args.batch}) x "
                   f"the lorasb step = " + (f"{results['epoch_s']:.1f} s" if results["epoch_s"] else "n/a")
                   + f"; SVD times are one lorasb_factors call per distinct target shape "
                   f"({results['init']['target_shapes']}) x the number of targets of that shape.")
    if "generation" in results:
        out.append(f"Generation: {PROMPT_LEN}-token random prompts, {NEW_TOKENS} new tokens, no EOS; one untimed "
                   f"round, then {args.gen_rounds} rounds, ours and transformers in turn.")
    if "memory" in results:
        if args.device.type == "cuda":
            out.append("Peak memory: torch.cuda.max_memory_allocated of each method alone on a fresh model, two steps.")
        elif all(row.get("peak_memory_per_method", True) for row in results["memory"].values()):
            out.append(f"Peak memory: peak RSS (reset through /proc/self/clear_refs) of each method alone on a "
                       f"fresh model, two steps; it includes {setup['baseline_rss_bytes'] / 2**20:,.0f} MiB of Python "
                       f"and torch (the PEFT row also holds transformers and peft).")
        else:
            out.append("Peak memory: the peak RSS since the process started (/proc/self/clear_refs could not reset "
                       "it): the largest figure so far, not per method.")
        if args.dtype == torch.bfloat16:
            out.append("full keeps bf16 weights, gradients and AdamW states (train_gsm8k.py keeps fp32 trained "
                       "weights).")
    missing = hf_available()
    out.append(f"transformers + PEFT skipped: {' and '.join(missing)} not installed." if missing else
               f"transformers: the same {'config, random weights' if args.config else 'checkpoint'}, sdpa attention, "
               f"{setup['dtype']}; PEFT LoRA on the same seven targets, same step.")
    return out


def report(results: dict, args) -> str:
    setup = results["setup"]
    lines = [f"## bench.py: {setup['model']} on {setup['device_name']}, {setup['dtype']}, batch {args.batch} x "
             f"{args.seq} tokens", ""]
    if "training" in results:
        gauge = results["training"]["gauge"]
        lines += [f"**Noise gauge: lorasb / loraxs step = {fmt(gauge, spec='.3f')}** (the two do the same work: the "
                  f"distance from 1.00 is this run's noise)" if gauge else
                  "**Noise gauge: n/a** (lorasb or loraxs failed)", ""]
    lines += [*machine_lines(results), ""]
    if "training" in results and args.quantize == "nf4":
        lines += [*nf4_table(results, args), ""]
    sections = {"training": training_table, "memory": training_table, "init": init_table,
                "generation": generation_table, "tokenizers": tokenizer_table}
    done = set()
    for key, table in sections.items():
        if key in results and table not in done:
            lines += [*table(results, args), ""]
            done.add(table)
    return "\n".join(lines + [f"- {note}" for note in notes(results, args)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return run_bench(args)
    finally:
        torch.set_num_threads(threads)


def run_bench(args) -> dict:
    config = model_lib.ModelConfig.from_hf(hf_config(args))
    limit = min(min(m.weight.shape) for m in lorasb.find_targets(model_lib.build_model(config)).values())
    if max(args.rank, LORA_RANK) > limit:
        raise ValueError(f"the smallest target layer of this model allows rank <= {limit}: lower --rank "
                         f"(LoRA uses r={LORA_RANK}, so this model is too small for the comparison)")
    machine = Machine()
    start = time.perf_counter()
    results = {"setup": {
        "model": f"--config {args.config} (random weights)" if args.config else str(args.model),
        "device_name": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()})",
        "dtype": str(args.dtype).removeprefix("torch."), "batch": args.batch, "seq": args.seq, "rounds": args.rounds,
        "warmup": args.warmup, "gen_rounds": args.gen_rounds, "init_rounds": args.init_rounds, "rank": args.rank,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "baseline_rss_bytes": proc_status_bytes("VmRSS")}}

    def log(what):
        print(f"bench: {what} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    results["epoch_s"] = None
    if "init" in args.phases:
        with machine.phase("initialization"):
            results["init"] = bench_init(args, machine, log)
        release_memory()
    if "memory" in args.phases:
        results["memory"] = {}
        with machine.phase("memory"):
            for method in training_methods():
                log(f"peak memory: {method}")
                try:
                    results["memory"][method] = bench_memory(args, method)
                except torch.OutOfMemoryError:
                    release_memory()
                    results["memory"][method] = {"error": "out of memory"}
    if "training" in args.phases:
        with machine.phase("training rounds"):
            results["training"] = bench_training(args, machine, lambda what: log(f"training: {what}"))
        log(f"noise gauge lorasb / loraxs = {fmt(results['training']['gauge'], spec='.3f')}")
        lorasb_step = results["training"]["rows"]["lorasb"].get("step_s")
        if lorasb_step:
            results["epoch_s"] = math.ceil(GSM8K_TRAIN_EXAMPLES / args.batch) * lorasb_step["median"]
    if "generation" in args.phases:
        with machine.phase("generation"):
            results["generation"] = bench_generation(args, machine, lambda what: log(f"generation: {what}"))
        release_memory()
    if "tokenizers" in args.phases:
        with machine.phase("tokenizers"):
            log("tokenizers")
            results["tokenizers"] = bench_tokenizers(args, machine)
    results["wall_s"] = time.perf_counter() - start
    results["machine"] = machine.finish()
    for warning in results["machine"]["warnings"]:
        log(f"WARNING: {warning}")
    print(report(results, args), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
