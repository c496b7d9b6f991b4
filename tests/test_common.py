"""experiments/common.py on the tiny model: a run is the trainer's own loop (train_gsm8k.train) with the losses and
probes recorded through after_step, a non-finite loss ends it, trained weights load back for evaluation, the results
file reuses a part only under its settings, and the Wilson interval."""

import json
import math

import pytest
import torch

import data
import lorasb
import train_gsm8k as trainer
from experiments import common
from machinery.tokenizer import Tokenizer


def run_args(model_dir, data_dir, out, **settings):
    return common.trainer_arguments({
        "model": model_dir, "data_dir": data_dir, "out_dir": out, "device": "cpu", "dtype": "float32",
        "method": "lorasb", "rank": 4, "lr": 1e-3, "max_steps": 4, "batch_size": 2, "micro_batch_size": 1,
        "num_init_samples": 4, **settings})


@pytest.fixture(scope="module")
def examples(tiny_model_dir, tiny_gsm8k_dir):
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    pairs = [data.gsm8k_pair(r) for r in data.load_gsm8k("train", tiny_gsm8k_dir)]
    return data.tokenize_dataset(tokenizer, pairs, 256)[0], tokenizer.pad_id


def test_a_run_is_the_trainers_loop_recording_every_loss_and_probe(tiny_model_dir, tiny_gsm8k_dir, examples,
                                                                    tmp_path, monkeypatch):
    loops, train = [], trainer.train
    monkeypatch.setattr(trainer, "train", lambda *a, **k: loops.append(a) or train(*a, **k))
    probed = []
    run = common.run_training(tiny_model_dir, *examples, run_args(tiny_model_dir, tiny_gsm8k_dir, tmp_path), "test",
                           probe=lambda model, setup: probed.append(len(lorasb.adapters(model))) or len(probed),
                           probe_every=2)
    assert len(loops) == 1  # the trainer's loop, once, ran every step
    assert len(run.losses) == run.plan.total_steps == 4 and all(math.isfinite(loss) for loss in run.losses)
    assert run.probes == {0: 1, 2: 2, 4: 3} and set(probed) == {14}  # step 0, then every 2 steps, on the adapters
    assert not run.diverged and run.trainable == 14 * 4 * 4  # 2 layers x 7 targets x r^2


def test_a_non_finite_loss_ends_the_run(tiny_model_dir, tiny_gsm8k_dir, examples, tmp_path, monkeypatch):
    steps, train_step = [], trainer.train_step

    def nan_at_step_2(model, optimizer, batches, step, *rest):
        steps.append(step)
        result = train_step(model, optimizer, batches, step, *rest)
        return {**result, "loss": result["loss"] * math.nan} if step == 2 else result

    monkeypatch.setattr(trainer, "train_step", nan_at_step_2)
    run = common.run_training(tiny_model_dir, *examples, run_args(tiny_model_dir, tiny_gsm8k_dir, tmp_path), "test",
                           probe=lambda model, setup: "probed", probe_every=1)
    assert steps == [1, 2] and run.diverged
    assert math.isfinite(run.losses[0]) and run.losses[1:] == [None]
    assert set(run.probes) == {0, 1}  # no probe of the diverged step


@pytest.mark.parametrize("method", ["lorasb", "full"])
def test_trained_weights_load_back_for_evaluation(method, tiny_model_dir, tiny_gsm8k_dir, examples, tmp_path):
    args = run_args(tiny_model_dir, tiny_gsm8k_dir, tmp_path, method=method, rank=4 if method == "lorasb" else None,
                    max_steps=2, lr=1e-2)
    run = common.run_training(tiny_model_dir, *examples, args, "test")
    path = tmp_path / "trained.safetensors"
    trainer.save_trainable(run.model, path, method, str(tiny_model_dir))
    loaded = common.base_model(tiny_model_dir, run.setup)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = loaded(ids)
        common.load_trained(loaded, path, method)
        torch.testing.assert_close(loaded(ids), run.model(ids))
        assert not torch.allclose(before, loaded(ids))  # training changed the model, and the change loaded back


def test_a_part_is_reused_only_under_its_own_settings(tmp_path, capsys):
    path = tmp_path / "results.json"
    first = common.Results(path, "test")
    assert first.part("a", lambda: {"x": 1}, settings={"lr": 1})["x"] == 1
    again = common.Results(path, "test")
    assert again.part("a", lambda: pytest.fail("recomputed"), settings={"lr": 1})["x"] == 1
    assert again.part("a", lambda: {"x": 2}, settings={"lr": 2})["x"] == 2
    printed = capsys.readouterr().out
    assert "test: a: reused (same settings)" in printed and "test: a: settings changed, recomputed" in printed
    again.save(summary={"done": True})
    assert json.loads(path.read_text()) == {"summary": {"done": True}, "parts": again.parts}
    assert again.account().startswith("test: this run reused 1 of 2 parts from")


def test_the_wilson_interval_holds_the_proportion_and_stays_in_0_1():
    assert common.wilson_interval(0, 10) == [0.0, pytest.approx(0.2775, abs=1e-4)]
    low, high = common.wilson_interval(5, 10)
    assert low == pytest.approx(1 - high) and low < 0.5 < high
    assert common.wilson_interval(10, 10)[1] == 1.0
