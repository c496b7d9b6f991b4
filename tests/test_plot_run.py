"""experiments/plot_run.py: a run's metrics.jsonl drawn as an SVG loss curve."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from experiments import plot_run


def write_metrics(folder, losses, cut_last_line=False):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": i + 1, "loss": loss, "lr": 1e-4}) for i, loss in enumerate(losses)]
    text = "\n".join(lines) + "\n" + ('{"step": 99, "lo' if cut_last_line else "")
    (folder / "metrics.jsonl").write_text(text)


def test_plot_draws_every_step_and_skips_a_line_cut_short(tmp_path):
    write_metrics(tmp_path / "run", [3.0, 2.0, 1.5, 1.0], cut_last_line=True)
    assert plot_run.read_losses(tmp_path / "run") == ([1, 2, 3, 4], [3.0, 2.0, 1.5, 1.0])
    out = plot_run.main([str(tmp_path / "run")])
    assert out == tmp_path / "run" / "loss.svg"
    svg_text = out.read_text()
    assert svg_text.startswith("<svg") and svg_text.count("<circle") == 4 and ">run<" in svg_text


def test_moving_average_uses_the_values_so_far():
    assert plot_run.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_missing_or_empty_metrics_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        plot_run.main([str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no step with a loss"):
        plot_run.main([str(tmp_path / "empty")])


def test_runs_as_a_file_from_the_repository_root(tmp_path):
    write_metrics(tmp_path / "a", [2.0, 1.0])
    done = subprocess.run([sys.executable, "experiments/plot_run.py", str(tmp_path / "a"), "--out",
                           str(tmp_path / "a.svg")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a.svg").read_text().startswith("<svg")


def test_by_default_the_loss_is_drawn_beside_its_moving_average_and_the_held_out_loss(tmp_path):
    """What a reader compares (before: the raw loss alone, so a 2-point run read as "it got worse")."""
    losses = [3.0 - 0.1 * i + (0.3 if i % 2 else 0.0) for i in range(20)]
    write_metrics(tmp_path / "run", losses)
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"held_out_loss": 1.234}))
    svg_text = plot_run.main([str(tmp_path / "run")]).read_text()
    assert ">run (3-step mean)<" in svg_text and ">run (each logged step)<" in svg_text
    assert ">run held-out loss 1.234<" in svg_text and 'stroke-dasharray="6,4"' in svg_text
    assert svg_text.count("<circle") == 20 + 20 + 1  # the loss, its mean, the held-out loss at the last step
    assert plot_run.moving_average(losses, 3)[-1] == pytest.approx(sum(losses[-3:]) / 3)
    svg_text = plot_run.main([str(tmp_path / "run"), "--smooth", "1"]).read_text()
    assert "mean" not in svg_text and svg_text.count("<circle") == 21
