"""What the trainer tells its user beyond the progress bars: the device line that opens a run, the peak memory, and
the summary that closes it (each test set's accuracy, the held-out loss, the timings and the files written)."""

import re
import resource
import sys
from pathlib import Path

import torch

from machinery import run_folder


def device_line(setup) -> str:
    """The run's first line: where it computes and in which dtype (a CPU run is many times slower: said at once)."""
    if setup.device.type == "cuda":
        where = f"{setup.device} ({torch.cuda.get_device_name(setup.device)})"
    elif setup.device.type == "cpu":
        found = "a GPU is there, --device cpu asks for the CPU" if torch.cuda.is_available() else "no GPU found"
        where = f"cpu ({found}; {torch.get_num_threads()} threads)"
    else:
        where = str(setup.device)
    dtype = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    computing = f", computing in {dtype(setup.compute_dtype)}" if setup.compute_dtype != setup.weights_dtype else ""
    return f"device {where}, weights {dtype(setup.weights_dtype)}{computing}"


def peak_memory_bytes(device: torch.device) -> int:
    """The peak memory of this process: CUDA tensors allocated on `device`, or else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # KiB


def outputs_written(args, tasks: list) -> list[str]:
    """What a run writes into its out_dir (listed at its end): the evaluation's files, and a training run's own."""
    evaluation = ["summary.json", *(task.predictions for task in tasks)]
    if args.eval_only:
        return evaluation
    trained = ["model/"] if args.method == "full" else ["adapter.safetensors", "peft_adapter/"]
    return ["config.json", "metrics.jsonl", run_folder.CHECKPOINTS + "/", *trained, *evaluation]


def print_summary(summary: dict, tasks: list, out: Path, outputs: list[str]) -> None:
    """The end of a run's output: each evaluated set's accuracy (data.EvalTask: its title and remark), the held-out
    loss, what was evaluated, the timings, the peak memory and the files written."""
    accuracies = [f"{task.title} test: {m['accuracy']:.2%} ({m['correct']}/{m['total']}, {m['invalid']} without an "
                  f"answer){task.remark(m)}" for task in tasks for m in [summary[task.name]]]
    if "commonsense_accuracy" in summary:
        accuracies.append(f"commonsense mean accuracy: {summary['commonsense_accuracy']:.2%}")
    trained = (f"trainable parameters {summary['trainable_parameters']:,} | init {summary['init_seconds']:.1f} s | "
               f"{training_time(summary)} | ") if "train_seconds" in summary else ""  # not eval-only
    print(f"\n{'=' * 72}\n" + "\n".join(accuracies) + f"\nheld-out loss {summary['held_out_loss']:.4f} on "
          f"{summary['held_out_loss_on']}  [{summary['method']}, rank {summary['rank']}, {summary['model']}]\n"
          f"{trained}peak memory {summary['peak_memory_bytes'] / 2**30:.2f} GiB\n"
          f"outputs in {out}/: {', '.join(outputs)}\n{'=' * 72}")


def training_time(summary: dict) -> str:
    """The whole run's training time; of a resumed run, also the part since it resumed."""
    whole = summary["train_seconds"]
    if "resumed_train_seconds" not in summary:
        return f"training {whole:.1f} s"
    part = f"{summary['resumed_train_seconds']:.1f} s since it resumed at step {summary['resumed_at_step']}"
    return f"training {whole:.1f} s ({part})" if whole is not None else \
        f"training {part} (its checkpoint did not record the time before)"


def plainly(warning: str) -> str:
    """A warning of data.py, in words a user reads once and understands (any other as it is)."""
    found = re.match(r"(\d+) of (\d+) prompts tokenize differently alone than inside prompt \+ response", warning)
    if not found:
        return warning
    return (f"in {found[1]} of {found[2]} training examples the tokenizer joins the last character of the prompt and "
            f"the first of the answer into one token, so there the line between the text the model reads and the "
            f"answer it learns is one token off (as in the authors' runs; nothing to do)")
