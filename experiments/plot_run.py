"""Draw the training loss of one or more runs from their metrics.jsonl, as an SVG file (no plotting library).

    python experiments/plot_run.py runs/gsm8k-lorasb-r96                      # writes runs/gsm8k-lorasb-r96/loss.svg
    python experiments/plot_run.py runs/gsm8k-lorasb-r96 runs/gsm8k-lora-r32 --out loss.svg --smooth 10

Each run is a trainer --out_dir (or its metrics.jsonl); lines that are not complete JSON records are skipped, as the
trainer itself skips a line a crash cut short.
"""

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python experiments/plot_run.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from experiments import svg  # noqa: E402


def read_losses(run: Path) -> tuple[list[int], list[float]]:
    """(steps, losses) of a run folder's metrics.jsonl, in step order."""
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: pass a trainer --out_dir or its metrics.jsonl")
    rows = {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            rows[int(row["step"])] = float(row["loss"])
        except (ValueError, KeyError, TypeError):
            continue
    if not rows:
        raise SystemExit(f"error: {path} holds no step with a loss yet")
    steps = sorted(rows)
    return steps, [rows[s] for s in steps]


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and up to window - 1 before it."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trainer --out_dir folders (or their metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="the SVG to write (default: loss.svg in the first run's folder)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in logged steps (default 1)")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error("--smooth must be at least 1")
    series = []
    for run in args.runs:
        steps, losses = read_losses(run)
        label = run.name if run.is_dir() else run.parent.name
        series.append({"label": label, "x": steps, "y": moving_average(losses, args.smooth)})
    first = args.runs[0]
    out = args.out or (first if first.is_dir() else first.parent) / "loss.svg"
    title = "Training loss" + (f" ({args.smooth}-step mean)" if args.smooth > 1 else "")
    svg.line_plot(out, series, title, "optimizer step", "loss")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
