"""The 4-bit base's experiments on tiny budgets: experiments/quantized.py (7B shapes, memory and time of the grouped
estimate and a training step, refused before building a model that would not fit) and experiments/nf4_base.py
(SmolLM2-135M on fp32 against NF4, --quick on the tiny model: every part, written as it exists and reused)."""

import json
import weakref

import pytest
import torch

import model as model_lib
from experiments import bench, nf4_base, quantized


def test_quantized_experiment_runs_on_a_tiny_config_in_passes_and_reuses_its_result(tmp_path, capsys):
    argv = ["--config", "tiny", "--rank", "8", "--group_gib", str(2**15 / 2**30), "--json", str(tmp_path / "t.json")]
    results = quantized.main(argv)
    assert set(results["parts"]) == {"build", "estimate_and_adapters", "training_step"}
    assert all(p["seconds"] >= 0 and p["peak_rss_bytes"] > 0 for p in results["parts"].values())
    assert results["parts"]["estimate_and_adapters"]["passes"] == 10  # 32 KiB a pass: q,k,v; o; gate; up; down
    assert results["analytic"]["cpu_nf4_base"]["total"] < results["analytic"]["cpu_float32_base"]["total"]
    assert quantized.main(argv) == json.loads((tmp_path / "t.json").read_text())  # reused, not measured again
    assert "already holds this measurement" in capsys.readouterr().out


def test_quantized_experiment_refuses_a_run_that_would_not_fit_before_building_it(tmp_path):
    with pytest.raises(ValueError, match="would need about .* GiB.*pass a smaller --group_gib"):
        quantized.main(["--config", "mistral-7b", "--group_gib", "64", "--json", str(tmp_path / "m.json")])


def test_the_7b_estimate_in_default_passes_is_derived_within_16_gib():
    config = model_lib.ModelConfig.from_hf(bench.CONFIGS["mistral-7b"])
    parts = quantized.expected_memory(config, "nf4", torch.float32, 96, quantized.group_bytes(
        quantized.parse_args(["--json", "unused.json"])), 2 * 64)
    assert sum(parts.values()) < 16 * 2**30 and parts["estimate_sums"] <= 4 * 2**30


def test_nf4_base_quick_writes_every_part_and_reuses_them(tmp_path, tiny_model_dir, tiny_gsm8k_dir, capsys):
    argv = ["--quick", "--model", str(tiny_model_dir), "--data_dir", str(tiny_gsm8k_dir), "--out", str(tmp_path),
            "--device", "cpu"]
    data = nf4_base.main(argv)
    parts = data["parts"]
    assert set(parts) == {"frozen_bytes", "initialization", *(f"train/nf4_base-{q}-{m}" for m in nf4_base.LRS
                                                              for q in nf4_base.BASES)}
    assert parts["frozen_bytes"]["nf4"]["targets"] < parts["frozen_bytes"]["none"]["targets"] / 7  # 4.5 of 32 bits
    init = parts["initialization"]
    assert 0.5 < init["sign_agreement"] < 1 and 0 < init["B_overlap"] <= 1 + 1e-5 and 0 < init["A_overlap"] <= 1 + 1e-5
    assert all(0 < init["rho"][q]["lorasb"] <= init["rho"][q]["ceiling"] + 1e-6 for q in nf4_base.BASES)
    assert all(p["test_loss"] > 0 and p["validation_loss"] > 0 for name, p in parts.items() if name.startswith("train"))
    assert "| frozen weights, MiB" in (tmp_path / "nf4_base.md").read_text()
    assert nf4_base.main(argv)["parts"] == parts
    assert "this run reused 6 of 6 parts" in capsys.readouterr().out



def test_timed_passes_holds_no_group_while_the_next_is_computed():
    """Each group's dW must be freed before the next pass allocates its sums (the 7B run's memory bound): the wrapper
    that counts the passes keeps no reference to a group it has handed on (it did, and the 7B run peaked at 17 GiB)."""
    handed_on = []

    def groups():
        for _ in range(3):
            assert all(ref() is None for ref in handed_on), "a group handed on is alive while the next is computed"
            update = torch.zeros(4)
            handed_on.append(weakref.ref(update))
            yield {"layer": update}
            del update

    record = {"passes": 0, "estimate_seconds": 0.0}
    for group in quantized.timed_passes(groups(), record):
        del group  # the consumer drops each group, as lorasb.add_adapters does
    assert record["passes"] == 3
