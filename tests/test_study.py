"""experiments/study.py in --quick mode on the tiny model: every part runs, the JSON has the structure the report and
the README read, and the invariants of the measurements hold (the figures themselves mean nothing at this size)."""

import json
import shutil
import subprocess
import sys
import types

import pytest

from conftest import REPO, write_tiny_llama
from experiments import common, study


def quick_argv(model_dir, data_dir, out, *extra) -> list[str]:
    return ["--quick", "--model", str(model_dir), "--data_dir", str(data_dir), "--out", str(out), "--device", "cpu",
            *extra]


@pytest.fixture(scope="module")
def quick(tmp_path_factory, tiny_model_dir, tiny_gsm8k_dir):
    out = tmp_path_factory.mktemp("study")
    results = study.main(quick_argv(tiny_model_dir, tiny_gsm8k_dir, out))
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


def test_a_second_run_recomputes_nothing_and_says_so_at_its_start_and_end(quick, tiny_model_dir, tiny_gsm8k_dir,
                                                                          monkeypatch, capsys):
    out, results = quick
    monkeypatch.setattr(study, "train_run", lambda *a, **k: pytest.fail("a finished part was recomputed"))
    capsys.readouterr()
    again = study.main(quick_argv(tiny_model_dir, tiny_gsm8k_dir, out))
    assert again["parts"] == results["parts"]
    printed, file, n = capsys.readouterr().out, out / "study.json", len(results["parts"])
    start = printed.index(f"study: {file} already holds {n} parts computed with these settings (the same model "
                          f"weights, data and budget): they are reused, not computed again. To compute everything "
                          f"anew, pass another --out")
    end = printed.index(f"study: this run reused {n} of {n} parts from {file}, computed earlier with the same "
                        f"settings: setup, claim1/at_init, ")
    assert start < printed.index("Claim 1") < end
    assert printed.endswith(f"It computed nothing new: every figure above was read from that file, and the compute "
                            f"time above is what its parts took when they were computed. To compute everything anew, "
                            f"pass another --out (or delete {file}).\n")


def test_a_rerun_computes_only_the_missing_parts_and_lists_both(quick, tiny_model_dir, tiny_gsm8k_dir, tmp_path,
                                                                 monkeypatch, capsys):
    out = tmp_path / "study"
    shutil.copytree(quick[0], out)
    stored = json.loads((out / "study.json").read_text())
    del stored["parts"]["claim4/lr_1"]
    (out / "study.json").write_text(json.dumps(stored))
    monkeypatch.setattr(study, "train_run", lambda *a, **k: pytest.fail("a finished part was recomputed"))
    study.main(quick_argv(tiny_model_dir, tiny_gsm8k_dir, out))
    n = len(quick[1]["parts"])
    printed = capsys.readouterr().out
    assert f"reused {n - 1} of {n} parts" in printed and "It computed 1: claim4/lr_1. To compute" in printed


def test_parts_computed_with_other_weights_data_or_budget_are_not_reused(quick, tiny_model_dir, tiny_gsm8k_dir,
                                                                        tmp_path):
    out = quick[0]
    before = (out / "study.json").read_text()
    other_weights = write_tiny_llama(tmp_path / "elsewhere" / tiny_model_dir.name, seed=1)  # the same folder name
    with pytest.raises(SystemExit, match=r"study.json holds a study computed with other settings: the model's "
                                         r"weights \(fingerprint \w+\.\.\. there, \w+\.\.\. here\)\. Its parts "
                                         r"cannot be reused: pass another --out"):
        study.main(quick_argv(other_weights, tiny_gsm8k_dir, out))
    other_data = shutil.copytree(tiny_gsm8k_dir, tmp_path / "elsewhere" / tiny_gsm8k_dir.name)
    (other_data / "test.jsonl").write_text((other_data / "test.jsonl").read_text().replace("apples", "pears", 1))
    with pytest.raises(SystemExit, match=r"other settings: the data \(the sha256 of test.jsonl\)\."):
        study.main(quick_argv(tiny_model_dir, other_data, out))
    with pytest.raises(SystemExit, match=r"other settings: steps 4 there, 3 here\."):
        study.main(quick_argv(tiny_model_dir, tiny_gsm8k_dir, out, "--steps", "3"))
    assert (out / "study.json").read_text() == before


def test_a_file_without_fingerprints_is_not_reused(quick, tiny_model_dir, tiny_gsm8k_dir, tmp_path):
    """A study.json made before the fingerprints were recorded (the committed one is) cannot be checked: refused."""
    out = tmp_path / "unverifiable"
    out.mkdir()
    stored = json.loads((quick[0] / "study.json").read_text())
    del stored["settings"]["model fingerprint"], stored["settings"]["data sha256"]
    (out / "study.json").write_text(json.dumps(stored))
    with pytest.raises(SystemExit, match=r"records no fingerprint of the model's weights or of the data it was "
                                         r"computed with .* cannot check .*\. Pass another --out to compute the "
                                         r"study anew"):
        study.main(quick_argv(tiny_model_dir, tiny_gsm8k_dir, out))
    committed = json.loads((study.RESULTS_DIR / "study.json").read_text())["settings"]
    assert "records no fingerprint" in common.reuse_problem(study.RESULTS_DIR / "study.json", committed,
                                                             {**committed, "model fingerprint": "0", "data sha256": {}})


def test_the_committed_results_still_make_the_committed_report_and_plots(tmp_path):
    """The committed study.json stays readable by the summary and plot code: they remake study.md and the SVGs."""
    committed = json.loads((study.RESULTS_DIR / "study.json").read_text())
    results = common.Results(tmp_path / "unused.json", "study", committed["settings"])
    results.data = committed
    budget = study.Budget()
    chosen = study.claim3(types.SimpleNamespace(budget=budget), results)  # every part is there: nothing runs
    assert study.summarize(results, chosen, budget) == (study.RESULTS_DIR / "study.md").read_text()
    study.plot(results, chosen, budget, tmp_path)
    for svg in ("loss_curves", "rho_over_training", "rho_vs_init_samples", "initial_jump"):
        assert (tmp_path / f"{svg}.svg").read_text() == (study.RESULTS_DIR / f"{svg}.svg").read_text()


def test_runs_as_a_file_and_as_a_module_from_the_repository_root():
    for command in (["experiments/study.py", "--help"], ["-m", "experiments.study", "--help"]):
        done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage:")
