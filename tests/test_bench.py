"""bench.py runs end to end on a tiny random config and reports every method (no timed assertions: speed is what
bench.py prints, not what tests check)."""

import json

from experiments import bench


def test_bench_reports_every_method_with_positive_figures(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "PROMPT_LEN", 8)  # generation lengths only change how long the test takes
    monkeypatch.setattr(bench, "NEW_TOKENS", 4)
    out = tmp_path / "bench.json"
    results = bench.main(["--config", "tiny", "--device", "cpu", "--dtype", "float32", "--batch", "8", "--seq", "16",
                          "--steps", "1", "--rank", "8", "--json", str(out)])
    table = capsys.readouterr().out

    labels = ["lorasb r=8", "loraxs r=8", "lora r=32, alpha 64", "full", "frozen (the floor)"]
    if isinstance(results["hf"], dict):  # transformers and peft installed
        labels.append("PEFT lora r=32, alpha 64 (transformers)")
    for label in labels:
        assert sum(line.startswith(f"| {label} |") for line in table.splitlines()) == 1, label
    for method, row in results["training"].items():
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and row["peak_memory_bytes"] > 0, method
    assert results["training"]["frozen"]["trainable"] == 0
    assert results["training"]["lorasb"]["trainable"] == 2 * 7 * 8 * 8  # 2 layers x 7 targets x r^2
    assert results["training"]["lora"]["trainable"] > results["training"]["lorasb"]["trainable"]
    init = results["init"]
    assert init["samples"] == 32 and init["targets"] == 14
    assert init["estimate_s"] > 0 and init["svd_exact_s"] > 0 and init["svd_randomized_s"] > 0
    assert set(results["generation"]) == {1, 16} and all(v > 0 for v in results["generation"].values())
    assert isinstance(results["tokenizers"], str)  # --config models have no tokenizer: a note, not a row
    assert len(results["targets"]) == 6 and all(t["measured"] > 0 for t in results["targets"])
    assert "| target | measured | |" in table
    assert json.loads(out.read_text())["training"]["full"]["trainable"] == results["training"]["full"]["trainable"]
