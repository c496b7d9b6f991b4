"""Draw the training loss of one or more runs from their metrics.jsonl, as an SVG file (no plotting library).

    python experiments/plot_run.py runs/gsm8k-lorasb-r96                      # writes runs/gsm8k-lorasb-r96/loss.svg
    python experiments/plot_run.py runs/gsm8k-lorasb-r96 runs/gsm8k-lora-r32 --out loss.svg --smooth 10

What a reader compares: the loss of each logged step is noisy (each is one batch), so beside it (dashed) comes its
moving average (solid; by default over a tenth of the logged steps, at least 3, once a run has 6), and, when the run's
summary.json has it, the held-out loss after training (a dot at the last step: the loss on test answers the run never
trained on). Each run is a trainer --out_dir (or its metrics.jsonl); lines that are not complete JSON records are
skipped, as the trainer itself skips a line a crash cut short.
"""

import argparse
import json
import math
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


def held_out_loss(run: Path) -> float | None:
    """The held-out loss of a run folder's summary.json, None when it has none (yet)."""
    path = run / "summary.json" if run.is_dir() else run.parent / "summary.json"
    try:
        value = json.loads(path.read_text())["held_out_loss"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def default_window(num_points: int) -> int:
    """A tenth of the logged steps, at least 3; 1 (no smoothing) below 6 points, where a mean would hide them."""
    return max(3, num_points // 10) if num_points >= 6 else 1


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and up to window - 1 before it."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="trainer --out_dir folders (or their metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="the SVG to write (default: loss.svg in the first run's folder)")
    parser.add_argument("--smooth", type=int, help="moving-average window in logged steps (default: a tenth of them, "
                        "at least 3; 1 draws the raw loss alone)")
    args = parser.parse_args(argv)
    if args.smooth is not None and args.smooth < 1:
        parser.error("--smooth must be at least 1")
    series, windows = [], set()
    for i, run in enumerate(args.runs):
        steps, losses = read_losses(run)
        label, color = run.name if run.is_dir() else run.parent.name, svg.COLORS[i % len(svg.COLORS)]
        window = args.smooth or default_window(len(steps))
        if window > 1:
            windows.add(window)
            series.append({"label": f"{label} ({window}-step mean)", "x": steps, "y": moving_average(losses, window),
                           "color": color})
        series.append({"label": f"{label} (each logged step)" if window > 1 else label, "x": steps, "y": losses,
                       "color": color, "dashed": window > 1})
        if (held_out := held_out_loss(run)) is not None:
            series.append({"label": f"{label} held-out loss {held_out:.3f}", "x": [steps[-1]], "y": [held_out],
                           "color": color})
    first = args.runs[0]
    out = args.out or (first if first.is_dir() else first.parent) / "loss.svg"
    title = "Training loss" + (", with its moving average" if windows else "")
    svg.line_plot(out, series, title, "optimizer step", "loss")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
