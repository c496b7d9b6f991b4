"""experiments/study.py in --quick mode on the tiny model: every part runs, the JSON has the structure the report and
the README read, and the invariants of the measurements hold (the figures themselves mean nothing at this size)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from experiments import study


@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_model_dir, tiny_gsm8k_dir):
    out = tmp_path_factory.mktemp("study")
    results = study.main(["--quick", "--model", str(tiny_model_dir), "--data_dir", str(tiny_gsm8k_dir),
                          "--out", str(out), "--device", "cpu"])
    return out, results


def test_every_part_is_in_the_json_and_the_plots_are_written(quick):
    out, results = quick
    parts = json.loads((out / "study.json").read_text())["parts"]
    assert parts == results["parts"]
    b = study.QUICK
    expected = {"setup", "claim1/at_init", "claim2/at_init", "claim3/eval/base", "claim4/lr_1"}
    expected |= {f"claim3/{study.run_name(m, r, lr)}" for (m, grid), r in zip(b.lr_grid, (None, 2, 4, 4))
                 for lr in grid}
    expected |= {f"claim4/samples-{n}" for n in (*b.init_samples, b.num_init_samples)}
    assert expected <= set(parts)
    assert all(part["seconds"] >= 0 for part in parts.values())
    for name in ("loss_curves", "rho_over_training", "rho_vs_init_samples", "initial_jump"):
        assert (out / f"{name}.svg").read_text().startswith("<svg")
    assert "Claim 1" in (out / "study.md").read_text()


def test_captured_fractions_are_shares_below_the_ceiling(quick):
    parts = quick[1]["parts"]
    at_init = parts["claim1/at_init"]
    for key in ("rho", "rho_small_rank"):
        for scope in (at_init[key]["all"], *at_init[key]["by_type"].values()):
            assert all(0 <= value <= 1 for value in scope.values())
            assert all(scope["ceiling"] >= scope[name] - 1e-9 for name in ("lorasb", "loraxs", "random"))
    for run in ("claim3/lorasb-r4-lr0.0001", "claim3/loraxs-r4-lr0.0001", "claim3/full-lr0.0001"):
        probes = parts[run]["probes"]
        assert set(probes) == {"0", "2", "4"}  # step 0, then every probe_every steps
        assert all(0 <= p["all"]["own"] <= p["all"]["ceiling"] + 1e-9 <= 1 + 1e-9 for p in probes.values())


def test_the_orthonormal_plain_gradient_is_the_optimal_one_and_the_scaled_is_not(quick):
    claim2 = quick[1]["parts"]["claim2/at_init"]
    assert claim2["orthonormal"]["all"]["relative_error"] < 1e-5
    assert claim2["orthonormal"]["all"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert claim2["scaled"]["all"]["relative_error"] > 0.5  # B = U S: the plain step is not P_B G P_A


def test_a_second_run_recomputes_nothing(quick, tiny_model_dir, tiny_gsm8k_dir, monkeypatch):
    out, results = quick
    monkeypatch.setattr(study, "train_run", lambda *a, **k: pytest.fail("a finished part was recomputed"))
    again = study.main(["--quick", "--model", str(tiny_model_dir), "--data_dir", str(tiny_gsm8k_dir),
                        "--out", str(out), "--device", "cpu"])
    assert again["parts"] == results["parts"]
    with pytest.raises(SystemExit, match="other settings"):
        study.main(["--quick", "--model", str(tiny_model_dir), "--data_dir", str(tiny_gsm8k_dir), "--out", str(out),
                    "--device", "cpu", "--steps", "3"])


def test_runs_as_a_file_and_as_a_module_from_the_repository_root():
    for command in (["experiments/study.py", "--help"], ["-m", "experiments.study", "--help"]):
        done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage:")
