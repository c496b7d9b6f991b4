"""train_gsm8k.py on a 4-bit frozen base (--quantize nf4): each adapter method trains, resumes bitwise and evaluates
unmerged; the LoRA-SB estimate in groups of layers; what --quantize refuses before the model loads; the run identity."""

import argparse
import copy
import functools
import json
import math

import pytest
import torch

import data
import lorasb
import model as model_lib
import train_gsm8k
from machinery import checkpoints, nf4


def trainer_argv(out, model_dir, data_dir, *extra) -> list[str]:
    """A 4-step run of rank 4 on the tiny model in NF4, checkpointed every 2 steps, evaluated on 2 questions."""
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--out_dir", str(out), "--device", "cpu",
            "--quantize", "nf4", "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "4", "--rank", "4",
            "--lr", "1e-2", "--num_init_samples", "6", "--eval_limit", "2", "--max_new_tokens", "4",
            "--save_every", "2", "--log_every", "1", *extra]


def run(tmp_path, model_dir, data_dir, *extra, name="run"):
    out = tmp_path / name
    return out, train_gsm8k.main(trainer_argv(out, model_dir, data_dir, *extra))


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The loaders the trainer called, in order: "nf4" (tensor by tensor into NF4) or "full precision"."""
    called = []
    for module, name, label in ((nf4, "load_nf4_model", "nf4"), (model_lib, "load_model", "full precision")):
        real = getattr(module, name)

        def recorded(*args, real=real, label=label, **kwargs):
            called.append(label)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)
    return called


def stop_after_the_step_2_checkpoint(monkeypatch):
    real_save = checkpoints.save

    def save_then_stop(out, step, *args):
        real_save(out, step, *args)
        raise KeyboardInterrupt  # the job is killed right after its step-2 checkpoint
    monkeypatch.setattr(checkpoints, "save", save_then_stop)
    return real_save


@pytest.mark.parametrize("method", ["lorasb", "loraxs", "lora"])
def test_each_adapter_method_trains_on_nf4_and_resumes_bitwise(tmp_path, tiny_model_dir, tiny_gsm8k_dir, monkeypatch,
                                                               loads, method):
    run_method = functools.partial(run, tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--method", method)
    straight, summary = run_method(name="straight")
    assert loads == ["nf4"]  # the base was read into NF4, never loaded in full precision
    assert summary["quantize"] == "nf4" and math.isfinite(summary["held_out_loss"]) and summary["gsm8k"]["total"] == 2
    assert json.loads((straight / "config.json").read_text())["quantize"] == "nf4"
    assert (straight / "peft_adapter" / "adapter_model.safetensors").is_file()

    real_save = stop_after_the_step_2_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_method(name="stopped")
    monkeypatch.setattr(checkpoints, "save", real_save)
    resumed, _ = run_method("--resume", name="stopped")
    a, _ = lorasb.load_safetensors(straight / "adapter.safetensors")
    b, _ = lorasb.load_safetensors(resumed / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_lorasb_on_nf4_starts_from_the_gradient_at_the_quantized_weights(tmp_path, tiny_model_dir, tiny_gsm8k_dir):
    """The NF4 run's initialization is that of G at Q(W0), not at W0: its B differs from the full-precision run's."""
    quantized, _ = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--max_steps", "1", name="nf4")
    argv = trainer_argv(tmp_path / "fp32", tiny_model_dir, tiny_gsm8k_dir, "--max_steps", "1", "--quantize", "none")
    train_gsm8k.main(argv)
    a, _ = lorasb.load_safetensors(quantized / "checkpoints" / "initial_adapter.safetensors")
    b, _ = lorasb.load_safetensors(tmp_path / "fp32" / "checkpoints" / "initial_adapter.safetensors")
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_quantize(tmp_path, tiny_model_dir, tiny_gsm8k_dir, monkeypatch):
    stop_after_the_step_2_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir)
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"cannot resume: this run differs from the checkpoint's \(--quantize: 'nf4' "
                                         r"-> 'none'\)"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--resume", "--quantize", "none")


@pytest.mark.parametrize("extra, refusal", [
    (("--method", "full"), r"--method full --quantize nf4: full fine-tuning trains every weight, and a 4-bit base is "
                           r"frozen"),
    (("--eval_merge", "bf16"), r"--eval_merge bf16 with --quantize nf4: a 4-bit base has no bf16 weights"),
    (("--targets", "q_proj,lm_head"), r"--targets with --quantize nf4: 1 target layer\(s\) cannot be quantized, e.g. "
                                      r"\['lm_head'\] \(nf4 keeps lm_head in the model's dtype"),
])
def test_what_nf4_cannot_do_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, tiny_gsm8k_dir, loads, extra,
                                                              refusal):
    with pytest.raises(SystemExit, match=refusal):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, *extra)
    assert loads == []


def test_eval_only_on_an_nf4_base_with_the_trained_adapter(tmp_path, tiny_model_dir, tiny_gsm8k_dir, loads):
    trained, summary = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--max_steps", "2")
    _, evaluated = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--eval_only", "--adapter",
                       str(trained / "adapter.safetensors"), name="eval")
    assert loads == ["nf4", "nf4"] and evaluated["held_out_loss"] == summary["held_out_loss"]


def nf4_model_with_adapters(model_dir):
    model = nf4.load_nf4_model(model_dir)
    g = torch.Generator().manual_seed(0)
    updates = {name: torch.randn(lorasb.layer_shape(m), generator=g) * 1e-2
               for name, m in lorasb.find_targets(model).items()}
    lorasb.add_adapters(model, "lorasb", 4, updates=updates)
    return model


def test_an_nf4_base_is_evaluated_unmerged_the_model_as_trained(tiny_model_dir):
    model = nf4_model_with_adapters(tiny_model_dir)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = model(ids)
    fp32 = train_gsm8k.Setup(False, 0, 1, torch.device("cpu"), torch.float32, torch.float32)
    evaluated = copy.deepcopy(model)
    train_gsm8k.prepare_evaluation(evaluated, argparse.Namespace(eval_merge="exact"), fp32)  # fp32 would merge
    assert all(m.merged_base_weight is None for m in lorasb.adapters(evaluated).values())
    with torch.no_grad():
        assert torch.equal(evaluated(ids), trained)


def test_nf4_weights_count_as_out_x_in_parameters(tiny_model_dir):
    counts = train_gsm8k.parameter_counts(nf4.load_nf4_model(tiny_model_dir), lorasb.DEFAULT_TARGETS)
    assert counts == train_gsm8k.parameter_counts(model_lib.load_model(tiny_model_dir), lorasb.DEFAULT_TARGETS)


def initialized_nf4(model_dir, data_dir, *extra):
    """The trainer's LoRA-SB initialization of the tiny model in NF4 (rank 4, 5 samples in batches of 2)."""
    args = train_gsm8k.parse_args(["--model", str(model_dir), "--data_dir", str(data_dir), "--rank", "4",
                                   "--num_init_samples", "5", "--micro_batch_size", "2", "--batch_size", "4",
                                   "--device", "cpu", "--max_steps", "10", "--quantize", "nf4", *extra])
    setup = train_gsm8k.Setup(False, 0, 1, torch.device("cpu"), torch.float32, torch.float32)
    loaded = train_gsm8k.load(args, setup)
    examples, _ = data.tokenize_dataset(loaded.tokenizer, loaded.pairs, args.max_length)
    plan = train_gsm8k.plan_training(args, len(examples), 1)
    model = train_gsm8k.load_base_model(loaded.folder, setup, args.quantize)
    train_gsm8k.initialize_adapters(model, examples, loaded.tokenizer.pad_id, args, plan, setup)
    return model


def test_the_estimate_in_groups_gives_the_same_initialization_and_says_its_passes(tiny_model_dir, tiny_gsm8k_dir,
                                                                                   capsys):
    """--init_group_gib small enough for two 32 x 32 layers (4 KiB of fp32 sums each) a pass: 10 passes over the
    same batches (data.Batches would move on between passes) give the one-pass B, R, A bit for bit."""
    one_pass = initialized_nf4(tiny_model_dir, tiny_gsm8k_dir)
    assert "1 pass(es) over them" in capsys.readouterr().out
    grouped = initialized_nf4(tiny_model_dir, tiny_gsm8k_dir, "--init_group_gib", str(8192 / 2**30))
    assert f"10 pass(es) over them, {8192 / 2**30:.2f} GiB" in capsys.readouterr().out
    got, expected = grouped.state_dict(), one_pass.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
