"""LoRA-SB of a 7B model on a 4-bit (NF4) frozen base, on a CPU: the memory and time of each part, measured.

Mistral-7B's shapes (experiments/bench.py's CONFIGS, random weights, no download) are built and quantized layer by
layer (machinery/nf4.py: no full-precision copy of the projections ever exists), then: LoRA-SB's first-update estimate
on a few short samples in groups of target layers (lorasb.estimate_by_group under --group_gib: one pass over the
samples per group, each group's dW turned into B, R, A by add_adapters before the next group is estimated), the
adapters at rank 96 (randomized SVD), and one training step (forward, backward, AdamW on R). Each part's time and peak
resident memory (VmHWM of /proc/self/status, reset before each part; the whole run's is the largest) go to a JSON
file, beside the analytic memory of the same run on fp32 and bf16 bases and the GPU memory to expect on one GPU
(derived, labelled as an estimate).

The real measurement (needs a quiet machine and ~16 GiB free; about half an hour on 2 cores):
    python experiments/quantized.py --config mistral-7b --json experiments/results/quantized_mistral-7b.json
A check that the script works (seconds):
    python experiments/quantized.py --config tiny --json /tmp/quantized_tiny.json

Activations are computed in fp32 (--dtype float32, the default): bf16 matmuls run ~20x slower than fp32 on this CPU,
and the 7B run fits 16 GiB in fp32 (the embedding and lm_head, not quantized, are then 1 GB instead of 0.5 GB).
Before anything is allocated the run's memory is estimated and the run refused when it exceeds --memory_limit or the
memory the machine has available. Re-running with the same settings prints the stored result (--redo measures again).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a file (python experiments/quantized.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorasb  # noqa: E402
import model as model_lib  # noqa: E402
from experiments import bench  # noqa: E402
from machinery import command, nf4  # noqa: E402

GiB = 2**30
GPU_BATCH, GPU_SEQ = 8, 512  # the trainer's batch on a GPU (experiments/bench.py's DEFAULTS["cuda"])
CUDA_CONTEXT = 0.5 * GiB  # the CUDA context and kernels, beside the tensors (a rough figure)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", default="mistral-7b", help=f"the shapes, random weights: {', '.join(bench.CONFIGS)}")
    a("--base", default="nf4", choices=("nf4", "float32", "bfloat16"), help="how the frozen weights are stored")
    a("--dtype", default="float32", choices=("float32", "bfloat16"), help="the compute dtype (activations, and the "
      "weights NF4 leaves unquantized: embedding, lm_head, norms)")
    a("--samples", type=int, default=2, help="examples of the first-update estimate")
    a("--seq", type=int, default=64, help="tokens per example")
    a("--rank", type=int, default=96, help="LoRA-SB rank")
    a("--group_gib", type=float, default=lorasb.DEFAULT_GROUP_BYTES / GiB, help="GiB of fp32 gradient sums per pass "
      "of the estimate (lorasb.estimate_by_group's group_bytes; default %(default)g: 7 passes for Mistral-7B)")
    a("--lr", type=float, default=1e-4, help="lr_1 of the estimate, and the learning rate of the training step")
    a("--memory_limit", type=float, default=16.0, help="GiB the run may need, estimated before it starts")
    a("--json", type=Path, required=True, help="where the results go")
    a("--redo", action="store_true", help="measure again even when --json holds a result of these settings")
    args = p.parse_args(argv)
    problems = [] if args.config in bench.CONFIGS else [f"--config {args.config!r}: choose one of "
                                                        f"{', '.join(bench.CONFIGS)}"]
    problems += [f"--{k} must be positive" for k in ("samples", "seq", "rank", "group_gib", "memory_limit")
                 if getattr(args, k) is not None and getattr(args, k) <= 0]
    if problems:
        raise ValueError("quantized.py: " + "; ".join(problems))
    return args


def settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("json", "redo", "memory_limit")}


# ---------------------------------------------------------------------------------------------------------------------
# Memory, derived before the run
# ---------------------------------------------------------------------------------------------------------------------

def group_bytes(args) -> int:
    return round(args.group_gib * GiB)


def expected_memory(config: model_lib.ModelConfig, base: str, dtype: torch.dtype, rank: int, group_bytes: int,
                    tokens: int) -> dict[str, int]:
    """Bytes of each part of the run's memory at its peak, derived (an upper bound: the last group of the estimate,
    with every adapter made but its own):
    the frozen weights; the estimate's fp32 gradient sums of its largest group of targets (lorasb.target_groups), each
    turned into its dW in turn (one layer's sum and dW alive at once: the largest layer's extra 4 bytes a weight);
    the adapters (B, A fp32, R with its gradient and AdamW's two states); the largest weight dequantized twice (forward
    and backward's copies); the activations kept for backward (~16 hidden-size and 3 intermediate-size vectors a token
    and layer, in the compute dtype) and the logits (fp32, three copies: logits, softmax, gradient)."""
    targets = lorasb.find_targets(model_lib.build_model(config))  # the skeleton on "meta"
    shapes = [lorasb.layer_shape(m) for m in targets.values()]
    compute = dtype.itemsize
    if base == "nf4":  # the 4-bit layers' codes and scales, the other weights in the compute dtype
        skeleton = nf4.build_nf4_model(config, "meta")
        frozen = nf4.nf4_bytes(skeleton) + sum(p.numel() for p in skeleton.parameters()) * compute
    else:
        frozen = sum(p.numel() for p in model_lib.build_model(config).parameters()) * getattr(torch, base).itemsize
    per_pass = max(sum(m.out_features * m.in_features for m in group.values())
                   for group in lorasb.target_groups(targets, group_bytes))
    largest = max(m * n for m, n in shapes)
    return {"frozen_weights": frozen,
            "estimate_sums": 4 * per_pass,
            "estimate_updates": 4 * largest,
            "adapters": sum(4 * rank * (m + n) for m, n in shapes) + 4 * 4 * rank * rank * len(shapes),
            "dequantized_weight": 2 * largest * compute if base == "nf4" else 0,
            "activations": tokens * config.num_hidden_layers * (16 * config.hidden_size
                                                                + 3 * config.intermediate_size) * compute,
            "logits": 3 * 4 * tokens * config.vocab_size}


def memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(expected: dict[str, int], limit_gib: float) -> None:
    """Refuse, before anything is allocated, a run whose derived memory exceeds the limit or what is available."""
    need = sum(expected.values())
    parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in expected.items())
    available = memory_available()
    if need > limit_gib * GiB or (available is not None and need > available):
        free = f"; the machine has {available / GiB:.1f} GiB available" if available is not None else ""
        raise ValueError(f"this run would need about {need / GiB:.1f} GiB ({parts} GiB), more than --memory_limit "
                         f"{limit_gib:g} GiB{free}: pass a smaller --group_gib (fewer target layers per pass of the "
                         f"estimate), or a smaller --config")


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------

def random_model(config: model_lib.ModelConfig, base: str, dtype: torch.dtype) -> model_lib.Transformer:
    """Weights ~ N(0, 0.02), norms 1 (as bench.random_model), made layer by layer: an NF4 base quantizes each
    projection from an fp32 weight that exists only while it is quantized."""
    if base != "nf4":
        return bench.random_model(config, "cpu", getattr(torch, base))
    model = nf4.build_nf4_model(config, "cpu", dtype)
    with torch.no_grad():
        for name, layer in nf4.nf4_layers(model).items():
            layer.quantize_(torch.randn(layer.out_features, layer.in_features) * 0.02, name)
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model.eval()


def causal_lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def timed_passes(groups, record: dict):
    """The groups of lorasb.estimate_by_group, one by one, counting the passes and the seconds spent computing them
    in record (the rest of the time add_adapters spends on their SVDs)."""
    groups = iter(groups)
    while True:
        start = time.perf_counter()
        group = next(groups, None)
        if group is None:
            return
        record["passes"] += 1
        record["estimate_seconds"] += time.perf_counter() - start
        yield group
        del group  # this group's dW are freed before the next pass allocates its sums, as add_adapters frees its own


def measure(name: str, part, results: dict):
    """Run part(), recording its time and the peak resident memory while it ran (VmHWM, reset first)."""
    print(f"quantized.py: {name} ...", flush=True)
    bench.reset_peak_memory(torch.device("cpu"))
    start = time.perf_counter()
    out = part()
    seconds = time.perf_counter() - start
    results["parts"][name] = {"seconds": seconds, "peak_rss_bytes": bench.proc_status_bytes("VmHWM"),
                              "rss_after_bytes": bench.proc_status_bytes("VmRSS")}
    return out


def run(args, config: model_lib.ModelConfig) -> dict:
    dtype = getattr(torch, args.dtype)
    results = {"settings": settings(args), "parts": {}}
    model = measure("build", lambda: random_model(config, args.base, dtype), results)
    results["frozen_bytes"] = nf4.nf4_bytes(model) + sum(t.nbytes for t in model.state_dict().values()
                                                         if t.is_floating_point())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (1, args.seq), generator=g) for _ in range(args.samples)]

    # each group of layers: one pass over the samples, then the SVDs of its dW, before the next group is estimated
    record = {"passes": 0, "estimate_seconds": 0.0}
    groups = timed_passes(lorasb.estimate_by_group(model, batches, causal_lm_loss, args.samples, args.lr,
                                                   group_bytes=group_bytes(args)), record)
    measure("estimate_and_adapters", lambda: lorasb.add_adapters(model, "lorasb", args.rank, updates=groups,
                                                                 svd="randomized"), results)
    results["parts"]["estimate_and_adapters"].update(record)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    def step():
        causal_lm_loss(model, torch.cat(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measure("training_step", step, results)
    # not ru_maxrss: resetting VmHWM before each part (clear_refs) resets it too, so it holds the last part's peak only
    results["peak_rss_bytes"] = max(part["peak_rss_bytes"] for part in results["parts"].values())
    return results


def analytic(args, config: model_lib.ModelConfig) -> dict:
    """The derived memory of this run on each base (CPU, --dtype), and of one GPU computing in bf16, for this run's
    samples and for the trainer's GPU batch (8 x 512 tokens): each part in bytes and their sum."""
    dtype = getattr(torch, args.dtype)
    out = {}
    for base in ("nf4", "float32", "bfloat16"):
        parts = expected_memory(config, base, dtype, args.rank, group_bytes(args), args.samples * args.seq)
        out[f"cpu_{base}_base"] = {**parts, "total": sum(parts.values())}
    for base in ("nf4", "bfloat16"):
        for batch, seq in ((args.samples, args.seq), (GPU_BATCH, GPU_SEQ)):
            parts = expected_memory(config, base, torch.bfloat16, args.rank, group_bytes(args), batch * seq)
            out[f"gpu_{base}_base_batch{batch}x{seq}_estimate"] = {**parts, "cuda_context": CUDA_CONTEXT,
                                                                   "total": sum(parts.values()) + CUDA_CONTEXT}
    return out


def report(results: dict) -> str:
    lines = [f"{name}: {p['seconds']:.1f} s, peak resident {p['peak_rss_bytes'] / GiB:.3f} GiB"
             + (f" ({p['passes']} passes of the estimate: {p['estimate_seconds']:.1f} s; the SVDs the rest)"
                if "passes" in p else "") for name, p in results["parts"].items()]
    lines.append(f"whole run: peak resident {results['peak_rss_bytes'] / GiB:.3f} GiB; frozen weights "
                 f"{results['frozen_bytes'] / GiB:.3f} GiB")
    lines += [f"derived, {name}: {parts['total'] / GiB:.3f} GiB" for name, parts in results["analytic"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.json.exists() and not args.redo:
        stored = json.loads(args.json.read_text())
        if stored.get("settings") == json.loads(json.dumps(settings(args))):
            print(f"{args.json} already holds this measurement (pass --redo to measure again):\n{report(stored)}")
            return stored
    config = model_lib.ModelConfig.from_hf(bench.CONFIGS[args.config])
    check_memory(expected_memory(config, args.base, getattr(torch, args.dtype), args.rank, group_bytes(args),
                                 args.samples * args.seq), args.memory_limit)
    torch.manual_seed(0)
    results = run(args, config)
    results["analytic"] = analytic(args, config)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    lorasb.atomic_write(args.json, lambda f: f.write(json.dumps(results, indent=1).encode()))
    print(report(results))
    return results


if __name__ == "__main__":
    command.run(main)
