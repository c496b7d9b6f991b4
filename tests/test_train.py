"""End-to-end tests of train_gsm8k.py on CPU with a tiny model, tokenizer and GSM8K-format data made by the tests."""

import argparse
import copy
import errno
import functools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import data
import lorasb
import model as model_lib
import train_gsm8k
from conftest import REPO, TINY_MATH, deadline, full_disk_during, write_tiny_gsm8k
from machinery import checkpoints, command, hub, run_identity
from machinery.tokenizer import Tokenizer


def trainer_argv(out, model_dir, data_dir, *extra) -> list[str]:
    """A 4-step LoRA-SB run of rank 4 on the tiny model, evaluated on 4 questions."""
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--out_dir", str(out), "--device", "cpu",
            "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "4", "--rank", "4", "--lr", "1e-2",
            "--num_init_samples", "6", "--eval_limit", "4", "--max_new_tokens", "6", "--log_every", "1", *extra]


def run(tmp_path, model_dir, data_dir, *extra, name="run"):
    out = tmp_path / name
    return out, train_gsm8k.main(trainer_argv(out, model_dir, data_dir, *extra))


def trainer_process(out, model_dir, data_dir, at_step_2: str, *extra) -> subprocess.Popen:
    """The trainer (trainer_argv) in a process of its own, which runs the Python statements `at_step_2` right after
    its optimizer step 2 (before the step boundary)."""
    code = "\n".join(["import os, signal, sys, time", "import train_gsm8k", "real_step = train_gsm8k.train_step",
                      "def train_step(*args):", "    result = real_step(*args)", "    if args[3] == 2:",
                      *[f"        {line}" for line in at_step_2.splitlines()], "    return result",
                      "train_gsm8k.train_step = train_step", "train_gsm8k.main(sys.argv[1:])"])
    return subprocess.Popen([sys.executable, "-c", code, *trainer_argv(out, model_dir, data_dir, *extra)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("method", ["lorasb", "loraxs", "lora", "full"])
def test_each_method_trains_saves_and_evaluates(tmp_path, tiny_model_dir, tiny_gsm8k_dir, method):
    out, summary = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--method", method)
    assert summary["gsm8k"]["total"] == 4 and summary["method"] == method
    config = json.loads((out / "config.json").read_text())
    assert config["grad_accum"] == 2 and config["total_steps"] == 4 and config["lr_1"] == pytest.approx(1e-2)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(set(m) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} for m in metrics)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and set(predictions[0]) == {"index", "question", "completion", "extracted", "gold",
                                                             "correct"}
    assert json.loads((out / "summary.json").read_text())["trainable_parameters"] == summary["trainable_parameters"]
    per_layer = {"lorasb": 16, "loraxs": 16}
    if method in per_layer:
        assert summary["trainable_parameters"] == 2 * 7 * per_layer[method]
    if method == "full":
        assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    else:
        assert (out / "adapter.safetensors").is_file() and (out / "peft_adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["lorasb", "loraxs", "lora", "full"])
def test_each_method_trains_in_bf16_as_on_a_gpu(tmp_path, tiny_model_dir, tiny_gsm8k_dir, method):
    """The GPU default on CPU: bf16 frozen weights, fp32 trained weights under bf16 autocast, the adapter evaluated
    unmerged."""
    out, summary = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--method", method, "--dtype", "bfloat16",
                       "--max_steps", "2", "--eval_limit", "2", "--max_new_tokens", "3")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert summary["gsm8k"]["total"] == 2 and math.isfinite(summary["held_out_loss"])
    saved, _ = lorasb.load_safetensors(out / ("model/model.safetensors" if method == "full" else "adapter.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in saved.values())


@pytest.mark.parametrize("method", ["lorasb", "full"])  # an adapter (B, A stored once), and every weight training
def test_resume_after_a_stop_ends_with_the_same_weights_bitwise(tmp_path, tiny_model_dir, tiny_gsm8k_dir, monkeypatch,
                                                                method):
    run_method = functools.partial(run, tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--method", method)
    straight, _ = run_method("--save_every", "2", name="straight")
    real_save = checkpoints.save

    def save_then_stop(out, step, *args):
        real_save(out, step, *args)
        raise KeyboardInterrupt  # the job is killed right after its step-2 checkpoint

    monkeypatch.setattr(checkpoints, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_method("--save_every", "2", name="stopped")
    monkeypatch.setattr(checkpoints, "save", real_save)
    resumed, _ = run_method("--save_every", "2", "--resume", name="stopped")
    output = "model/model.safetensors" if method == "full" else "adapter.safetensors"
    a, _ = lorasb.load_safetensors(straight / output)
    b, _ = lorasb.load_safetensors(resumed / output)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (resumed / "checkpoints" / "latest").read_text() == "step-0000004"


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_model_dir, tiny_gsm8k_dir):
    """(straight, stopped): a 4-step LoRA-SB run checkpointed every step, and the same run killed right after its
    step-3 checkpoint (it holds step-2 and step-3). Tests copy `stopped` before touching it."""
    tmp = tmp_path_factory.mktemp("stopped_run")
    straight, _ = run(tmp, tiny_model_dir, tiny_gsm8k_dir, "--save_every", "1", name="straight")
    real_save = checkpoints.save

    def save_then_stop(out, step, *args):
        real_save(out, step, *args)
        if step == 3:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(checkpoints, "save", save_then_stop)
        run(tmp, tiny_model_dir, tiny_gsm8k_dir, "--save_every", "1", name="stopped")
    return straight, tmp / "stopped"


def copy_of(run_dir, tmp_path):
    return shutil.copytree(run_dir, tmp_path / run_dir.name)


def flip_a_byte(path, at: int = -7):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))


def same_adapter(a, b) -> bool:
    x, _ = lorasb.load_safetensors(a / "adapter.safetensors")
    y, _ = lorasb.load_safetensors(b / "adapter.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_checkpoints_store_what_trains_and_the_frozen_factors_once(stopped_run):
    straight, stopped = stopped_run
    folder = stopped / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["initial_adapter.safetensors", "latest", "run.json",
                                                        "step-0000002", "step-0000003"]
    trained, _ = lorasb.load_safetensors(folder / "step-0000003" / "trainable.safetensors")
    initial, _ = lorasb.load_safetensors(folder / "initial_adapter.safetensors")
    assert len(trained) == 14 and all(name.endswith(".R") for name in trained)  # B and A are not repeated
    assert {name.rpartition(".")[2] for name in initial} == {"B", "R", "A"}
    final, _ = lorasb.load_safetensors(straight / "adapter.safetensors")  # the output stays self-contained
    assert all(torch.equal(final[k], initial[k]) for k in initial if not k.endswith(".R"))
    manifest = json.loads((folder / "step-0000003" / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {"step-0000003/trainable.safetensors", "step-0000003/state.pt", "run.json"}
    assert "initial_adapter sha256" in json.loads((folder / "run.json").read_text())


def test_resume_falls_back_past_a_damaged_checkpoint_and_ends_bitwise_equal(stopped_run, tmp_path, tiny_model_dir,
                                                                            tiny_gsm8k_dir, capsys):
    straight, stopped = stopped_run
    out = copy_of(stopped, tmp_path)
    flip_a_byte(out / "checkpoints" / "step-0000003" / "state.pt")  # the optimizer state: it would load silently
    (out / "checkpoints" / "latest").write_text("../../elsewhere\n")
    run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--save_every", "1", "--resume", name=out.name)
    assert "skipping damaged checkpoints (step-0000003: step-0000003/state.pt is damaged" in capsys.readouterr().out
    assert same_adapter(straight, out)


def test_resume_without_an_intact_checkpoint_says_so_before_loading_the_model(stopped_run, tmp_path, tiny_model_dir,
                                                                             tiny_gsm8k_dir, monkeypatch):
    monkeypatch.setattr(train_gsm8k.model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = copy_of(stopped_run[1], tmp_path)
    (out / "checkpoints" / "step-0000003" / "state.pt").write_bytes(b"")
    trainable = out / "checkpoints" / "step-0000002" / "trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"cannot resume: no intact checkpoint .*step-0000003: .*state.pt is damaged.*"
                                         r"step-0000002: .*trainable.safetensors is damaged.*--overwrite"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--save_every", "1", "--resume", name=out.name)
    out = copy_of(stopped_run[1], tmp_path / "second")
    flip_a_byte(out / "checkpoints" / "initial_adapter.safetensors")
    with pytest.raises(SystemExit, match="cannot resume: .*initial_adapter.safetensors is damaged"):
        run(tmp_path / "second", tiny_model_dir, tiny_gsm8k_dir, "--save_every", "1", "--resume", name=out.name)
    with pytest.raises(SystemExit, match="no checkpoint in .*to start over, run without --resume"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--resume", name="never_ran")


def test_resume_refuses_other_data_dtype_model_or_processes_but_not_another_spelling(stopped_run, tmp_path,
                                                                                      tiny_model_dir, tiny_gsm8k_dir,
                                                                                      monkeypatch):
    from conftest import write_tiny_llama

    monkeypatch.setattr(train_gsm8k.model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = copy_of(stopped_run[1], tmp_path)
    resume = ("--save_every", "1", "--resume")
    with pytest.raises(SystemExit, match="differs from the checkpoint's .*dtype: 'float32' -> 'bfloat16'"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, *resume, "--dtype", "bfloat16", name=out.name)
    other_data = shutil.copytree(tiny_gsm8k_dir, tmp_path / "other_data")
    (other_data / "train.jsonl").write_text((other_data / "train.jsonl").read_text().replace("Tom", "Ann", 1))
    with pytest.raises(SystemExit, match="training data sha256"):
        run(tmp_path, tiny_model_dir, other_data, *resume, name=out.name)
    other_model = write_tiny_llama(tmp_path / "other_model", seed=1)  # the same architecture, other weights
    with pytest.raises(SystemExit, match="--model: .* -> .*other_model.*model fingerprint"):
        run(tmp_path, other_model, tiny_gsm8k_dir, *resume, name=out.name)
    recorded = json.loads((out / "checkpoints" / "run.json").read_text())
    with pytest.raises(SystemExit, match="processes: 1 -> 2"):
        run_identity.check_same_run(out / "checkpoints", {**recorded, "processes": 2})
    args = train_gsm8k.parse_args(["--model", f"{tiny_model_dir}/", "--data_dir", str(tiny_gsm8k_dir), "--out_dir",
                                   str(out), "--device", "cpu", "--batch_size", "4", "--micro_batch_size", "2",
                                   "--max_steps", "4", "--rank", "4", "--lr", "1e-2", "--num_init_samples", "6"])
    setup = train_gsm8k.Setup(False, 0, 1, torch.device("cpu"), torch.float32, torch.float32)
    identity = run_identity.run_identity(args, 1, torch.float32, train_gsm8k.training_data_files(args),
                                          train_gsm8k.load(args, setup).folder)
    run_identity.check_same_run(out / "checkpoints", identity)  # a trailing / names the same folder: accepted


def test_resume_trims_a_cut_metrics_line_and_removes_interrupted_writes(stopped_run, tmp_path, tiny_model_dir,
                                                                        tiny_gsm8k_dir):
    out = copy_of(stopped_run[1], tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.1')  # a full disk cut the line
    leftovers = [out / ".summary.json.a1b2c3d4.tmp", out / "checkpoints" / ".run.json.zz_9x8w7.tmp",
                 out / "checkpoints" / ".tmp-step-0000004" / "state.pt"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
    run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--save_every", "1", "--resume", name=out.name)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not any(path.exists() for path in leftovers) and not (out / "checkpoints" / ".tmp-step-0000004").exists()


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(tmp_path, tiny_model_dir, tiny_gsm8k_dir,
                                                                            monkeypatch):
    real_save, real_fdopen = checkpoints.save, os.fdopen

    class FullDisk:
        """A file that takes 3000 bytes (the checkpoint's trainable.safetensors), then fails as a full disk does."""
        room = 3000

        def __init__(self, f):
            self.f = f

        def write(self, b):
            FullDisk.room -= len(b)
            if FullDisk.room < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def save_on_a_full_disk(out, step, *args):
        if step == 4:
            monkeypatch.setattr(lorasb.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
        real_save(out, step, *args)

    monkeypatch.setattr(checkpoints, "save", save_on_a_full_disk)
    with pytest.raises(SystemExit, match="checkpoint could not be written .*: the disk is full .*MiB free.*--resume"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--save_every", "2")
    monkeypatch.setattr(lorasb.os, "fdopen", real_fdopen)
    folder = tmp_path / "run" / "checkpoints"
    assert (folder / "latest").read_text() == "step-0000002"
    assert checkpoints.checkpoint_problem(folder / "step-0000002") is None
    assert sorted(p.name for p in folder.glob("*step*")) == ["step-0000002"]  # no half-written step 4
    assert not list(folder.glob(".*.tmp"))


def test_a_full_disk_while_writing_the_outputs_says_so_and_resume_writes_them(stopped_run, tmp_path, tiny_model_dir,
                                                                              tiny_gsm8k_dir, monkeypatch):
    full_disk_during(monkeypatch, train_gsm8k, "save_outputs")
    with pytest.raises(SystemExit, match=r"the outputs could not be written to .*: the disk is full \(.* MiB free "
                                         r"there\)\. Make room, then run again with --resume"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir)
    monkeypatch.undo()
    out = tmp_path / "run"
    assert (out / "checkpoints" / "latest").read_text() == "step-0000004" and not (out / "adapter.safetensors").exists()
    run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--resume")
    assert same_adapter(stopped_run[0], out) and (out / "summary.json").is_file()


def test_two_trainers_on_one_out_dir_the_second_is_refused_naming_the_first(tmp_path, tiny_model_dir,
                                                                             tiny_gsm8k_dir):
    out, ready, go = tmp_path / "shared", tmp_path / "ready", tmp_path / "go"
    wait = f"open({str(ready)!r}, 'w').close()\ndeadline = time.time() + 120\n" \
           f"while not os.path.exists({str(go)!r}) and time.time() < deadline:\n    time.sleep(0.05)"
    first = trainer_process(out, tiny_model_dir, tiny_gsm8k_dir, wait, "--save_every", "1")
    try:
        deadline = time.time() + 240
        while not ready.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert ready.exists(), first.communicate()[1][-3000:]
        before = sorted(p.name for p in (out / "checkpoints").iterdir())
        with pytest.raises(SystemExit, match=rf"--out_dir {out} is in use by another run \(pid {first.pid} on .*, "
                                             rf"started .* -c --model .*{out}.*\): wait for it to end"):
            run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--overwrite", "--lr", "1e-3", name="shared")
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing of the first was touched
        go.touch()
        _, stderr = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (out / "adapter.safetensors").is_file() and (out / "summary.json").is_file()


def test_overwrite_leaves_no_output_of_the_previous_run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, monkeypatch):
    out, _ = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--max_steps", "2", name="finished")
    mine = [out / "notes.txt", out / "notes" / ".draft.abcd1234.tmp"]  # the user's files, which stay
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        path.write_text("mine")
    finished = shutil.copytree(out, tmp_path / "finished_too")
    stale = ["adapter.safetensors", "peft_adapter", "summary.json", "predictions.jsonl"]
    with pytest.raises(SystemExit, match="training diverged"):  # a diverged overwrite
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--overwrite", "--lr", "1e9", name="finished")
    assert not any((out / name).exists() for name in stale) and not any((out / "checkpoints").glob("step-*"))
    real_save = checkpoints.save

    def save_then_stop(out, step, *args):
        real_save(out, step, *args)
        raise KeyboardInterrupt  # killed right after its first checkpoint

    monkeypatch.setattr(checkpoints, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):  # a killed overwrite, of another method
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--overwrite", "--method", "full", "--save_every", "1",
            name=finished.name)
    assert not any((finished / name).exists() for name in stale)
    assert sorted(p.name for p in (finished / "checkpoints").glob("step-*")) == ["step-0000001"]
    assert all(path.read_text() == "mine" for path in [*mine, finished / "notes.txt"])


def test_resume_refuses_a_changed_tokenizer_naming_the_file(tmp_path, tiny_model_dir, tiny_gsm8k_dir, monkeypatch):
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    run(tmp_path, model_dir, tiny_gsm8k_dir, "--max_steps", "2", "--eval_limit", "1", "--max_new_tokens", "1")
    monkeypatch.setattr(train_gsm8k.model_lib, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    config = model_dir / "tokenizer_config.json"
    original = config.read_text()
    config.write_text(original.replace('"eos_token": "<|endoftext|>"', '"eos_token": "\u0120a"'))
    with pytest.raises(SystemExit, match=r"cannot resume: this run differs from the checkpoint's \("
                                         r"tokenizer_config.json sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"):
        run(tmp_path, model_dir, tiny_gsm8k_dir, "--max_steps", "2", "--resume")
    config.write_text(original)
    (model_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": "\u0120a"}))
    with pytest.raises(SystemExit, match=r"special_tokens_map.json sha256: None -> '[0-9a-f]{64}'"):
        run(tmp_path, model_dir, tiny_gsm8k_dir, "--max_steps", "2", "--resume")


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_training_with_a_checkpoint_and_resume_ends_bitwise_equal(stopped_run, tmp_path, tiny_model_dir,
                                                                                  tiny_gsm8k_dir, name):
    out, signum = tmp_path / "signalled", signal.Signals[name]
    stopped = trainer_process(out, tiny_model_dir, tiny_gsm8k_dir, f"os.kill(os.getpid(), {int(signum)})")
    _, stderr = stopped.communicate(timeout=300)
    assert stopped.returncode == 128 + signum, stderr[-3000:]
    assert f"Stopped at step 2 by {signum.name}: its checkpoint is in {out / 'checkpoints'}" in stderr
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002" and not (out / "adapter.safetensors").exists()
    command = shlex.split(stderr.split("To continue the run:\n", 1)[1].splitlines()[0])
    assert command[:2] == ["python", "train_gsm8k.py"] and command[-1] == "--resume"
    train_gsm8k.main(command[2:])  # the command it printed, in this process
    assert same_adapter(stopped_run[0], out)


def test_a_second_signal_stops_training_at_once(tmp_path, tiny_model_dir, tiny_gsm8k_dir):
    out = tmp_path / "signalled"
    # a second SIGTERM, later than a copy of the first would come
    twice = "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(1.5)\nos.kill(os.getpid(), signal.SIGTERM)\n" \
            "time.sleep(60)"
    stopped = trainer_process(out, tiny_model_dir, tiny_gsm8k_dir, twice)
    _, stderr = stopped.communicate(timeout=300)
    assert stopped.returncode == 143, stderr[-3000:]
    assert "SIGTERM again: stopping at once, without a checkpoint of this step" in stderr
    assert not any((out / "checkpoints").glob("step-*"))  # --save_every 200: nothing was due before step 2


def listed_outputs(printed: str) -> set[str]:
    """The outputs the summary's last line names ("outputs in <out_dir>/: a, b/, ...")."""
    return set(re.search(r"^outputs in .*/: (.*)$", printed, re.M)[1].split(", "))


def written(out) -> set[str]:
    """What a run left in its out_dir, less its lock file (.lock, kept: removing a lock another run may be taking is
    a race)."""
    return {p.name + "/" * p.is_dir() for p in out.iterdir() if p.name != ".lock"}


def test_eval_only_with_the_saved_adapter_reproduces_the_predictions(tmp_path, tiny_model_dir, tiny_gsm8k_dir,
                                                                      capsys):
    trained, _ = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, name="trained")
    printed = capsys.readouterr().out
    assert listed_outputs(printed) == written(trained) and "trainable parameters" in printed
    evaluated, _ = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--eval_only", "--adapter",
                       str(trained / "adapter.safetensors"), name="evaluated")
    printed = capsys.readouterr().out
    assert listed_outputs(printed) == written(evaluated) == {"summary.json", "predictions.jsonl"}
    assert "trainable parameters" not in printed and "training" not in printed  # nothing trained, nothing said of it
    assert "held-out loss" in printed and "on 4 GSM8K test solutions" in printed  # --eval_limit 4
    assert (evaluated / "predictions.jsonl").read_text() == (trained / "predictions.jsonl").read_text()
    summary = json.loads((evaluated / "summary.json").read_text())
    assert (summary["method"], summary["rank"]) == ("lorasb", 4)  # described by the adapter, not by the defaults
    assert summary["held_out_loss_on"] == "4 GSM8K test solutions" and "train_seconds" not in summary
    assert (evaluated / "summary.json").stat().st_mode & 0o044  # readable by others, as a plain open() would make it
    assert not (evaluated / "checkpoints").exists()


def refused_by_argparse(capsys, *argv) -> str:
    """What argparse says when it refuses an argument of train_gsm8k.py (exit status 2)."""
    with pytest.raises(SystemExit) as refused:
        train_gsm8k.parse_args(list(argv))
    assert refused.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_refused_at_once_with_every_problem(tmp_path, tiny_model_dir, tiny_gsm8k_dir, capsys):
    assert "argument --method: invalid choice: 'dora'" in refused_by_argparse(capsys, "--method", "dora")
    assert "argument --init_rule: invalid choice: 'adam'" in refused_by_argparse(capsys, "--init_rule", "adam")
    assert "argument --batch_size: must be positive, got 0" in refused_by_argparse(capsys, "--batch_size", "0")
    assert "not allowed with argument" in refused_by_argparse(capsys, "--resume", "--overwrite")
    # argparse stops at the first argument it refuses: with an unknown method and --rank 0, the method; the rank is
    # then listed with every other problem once the method is fixed
    assert "argument --method: invalid choice: 'dora'" in refused_by_argparse(capsys, "--method", "dora", "--rank", "0")
    with pytest.raises(SystemExit) as refused:  # what argparse cannot see in one argument: every problem at once
        run(tmp_path, tiny_model_dir, tmp_path / "missing", "--batch_size", "5", "--adapter", str(tmp_path / "no"),
            "--rank", "0")
    message = str(refused.value)
    for expected in ["--rank 0: the rank must be at least 1", "--batch_size 5 is not a multiple", "--data_dir",
                     "--adapter is for --eval_only", "--adapter " + str(tmp_path / "no") + ": no such file"]:
        assert expected in message
    with pytest.raises(SystemExit, match=r"--rank 20 is too large for model.layers.0.self_attn.k_proj \(16 x 32\)"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--rank", "20")
    out, _ = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--max_steps", "1", name="taken")
    before = (out / "summary.json").read_text()
    with pytest.raises(SystemExit, match="exists and is not empty"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, name="taken")
    assert (out / "summary.json").read_text() == before


def test_a_diverging_run_stops_before_saving_and_keeps_the_last_two_checkpoints(tmp_path, tiny_model_dir,
                                                                                tiny_gsm8k_dir, monkeypatch, capsys):
    with pytest.raises(SystemExit, match=r"diverged .*NaN or inf at step 1\)\. Nothing from step 1 on was saved"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--lr", "1e9", name="at_once")
    assert not any((tmp_path / "at_once" / "checkpoints").glob("step-*"))
    assert not (tmp_path / "at_once" / "summary.json").exists()

    schedule = train_gsm8k.learning_rate  # a sane run whose step 4 is huge: its loss is finite, the next is not
    monkeypatch.setattr(train_gsm8k, "learning_rate", lambda step, *args: 1e30 if step == 4 else schedule(step, *args))
    with pytest.raises(SystemExit, match="at step 5"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--max_steps", "6", "--save_every", "1", name="later")
    out = tmp_path / "later"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000003", "step-0000004"]
    assert not (out / "adapter.safetensors").exists() and not (out / "summary.json").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert "argument --lr: must be a positive finite number, got nan" in refused_by_argparse(capsys, "--lr", "nan")


def test_examples_that_keep_no_response_token_are_left_out_and_refused_when_none_remains(tmp_path, tiny_model_dir,
                                                                                        capsys):
    data_dir = write_tiny_gsm8k(tmp_path / "data")
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    for row in rows[::2]:
        row["question"] += " Count them twice." * 4  # 68 more tokens of prompt: nothing of the response fits
    (data_dir / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, _ = run(tmp_path, tiny_model_dir, data_dir, "--max_length", "190", "--eval_limit", "1",
                 "--max_new_tokens", "1")
    assert "\nwarning: 24 of 48 training examples are left out" in capsys.readouterr().out
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    with pytest.raises(SystemExit, match="--max_length 170 leaves no response token in any of the 48"):
        run(tmp_path, tiny_model_dir, data_dir, "--max_length", "170", name="nothing")


def test_data_and_out_dir_problems_are_found_before_the_model_loads(tmp_path, tiny_model_dir, tiny_gsm8k_dir,
                                                                      monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was found")

    monkeypatch.setattr(train_gsm8k.model_lib, "load_model", no_loading)
    no_tests = write_tiny_gsm8k(tmp_path / "no_tests")
    (no_tests / "test.jsonl").write_text("")
    with pytest.raises(SystemExit, match="test.jsonl holds no test question"):
        run(tmp_path, tiny_model_dir, no_tests)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="a_file is a file, not a folder"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, name="a_file/run")
    with pytest.raises(SystemExit, match="--num_init_samples 49: the first-update estimate can use at most 48"):
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--num_init_samples", "49")
    no_train = write_tiny_gsm8k(tmp_path / "no_train")
    (no_train / "train.jsonl").write_text("")
    with pytest.raises(SystemExit, match=f"no training example in {no_train / 'train.jsonl'}: training needs one"):
        run(tmp_path, tiny_model_dir, no_train)
    for split, answer in [("test", "It is 5.\n#### abc"), ("train", "It is 5.")]:
        bad = write_tiny_gsm8k(tmp_path / f"bad_{split}")
        lines = (bad / f"{split}.jsonl").read_text().splitlines()
        lines[2] = json.dumps({"question": "q", "answer": answer})
        (bad / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        for eval_only in ([], ["--eval_only"]) if split == "test" else ([],):
            with pytest.raises(ValueError, match=rf"{split}\.jsonl:3: the answer does not end with a '#### N' line"):
                run(tmp_path, tiny_model_dir, bad, *eval_only)


def test_a_layer_count_the_weights_lack_is_refused_before_any_model_is_built(tmp_path, tiny_model_dir, tiny_gsm8k_dir):
    """check_model's skeleton of a million layers would take an hour, even on "meta": the headers are read first."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=1_000_000)))
    with deadline(30), pytest.raises(ValueError, match="'num_hidden_layers' is 1000000, but the checkpoint holds 2"):
        run(tmp_path, folder, tiny_gsm8k_dir)


@pytest.mark.parametrize("num_examples, batch_size, world_size", [(14, 4, 2), (10, 4, 2), (13, 2, 3), (5, 3, 1)])
def test_max_init_samples_is_what_every_process_batches_can_hold(num_examples, batch_size, world_size):
    examples = [{"input_ids": [1], "labels": [1]}] * num_examples
    capacity = [sum(map(len, data.Batches(examples, batch_size, 0, rank=r, world_size=world_size)
                        .epoch_batches(0))) for r in range(world_size)]
    fits = [n for n in range(1, num_examples + 1) if all(len(range(r, n, world_size)) <= capacity[r]
                                                         for r in range(world_size))]
    assert train_gsm8k.max_init_samples(num_examples, batch_size, world_size) == max(fits)


def test_config_records_what_was_resolved_and_the_long_phases_show_progress(tmp_path, tiny_model_dir, tiny_gsm8k_dir,
                                                                           capsys):
    argv = ["--model", str(tiny_model_dir), "--data_dir", str(tiny_gsm8k_dir), "--out_dir", str(tmp_path / "run"),
            "--device", "cpu", "--batch_size", "4", "--micro_batch_size", "4", "--max_steps", "2", "--rank", "4",
            "--eval_limit", "2", "--max_new_tokens", "2"]  # no --num_init_samples: the default is resolved
    train_gsm8k.main(argv)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["num_init_samples"], config["warmup_steps"], config["lr_1"]) == (32, 1, 1e-4)
    printed = capsys.readouterr()
    assert "\nwarning: lr_1 = 0.0001 is the peak learning rate: a schedule of 2 steps has 1 warmup step" in printed.out
    assert re.match(r"device cpu \((no GPU found|a GPU is there.*); \d+ threads\), weights float32\n", printed.out)
    progress = printed.err
    assert "adding adapters: 100%" in progress and "14/14" in progress and "held-out loss: 100%" in progress
    assert re.search(r"generate:\s+0%.*\| 0/4 ", progress)  # 2 questions x 2 tokens, in one batch


def test_the_estimate_bar_counts_a_batch_once_its_backward_pass_is_done(tiny_model_dir, tiny_gsm8k_dir,
                                                                         monkeypatch):
    """The bar reaches 100% when the estimate is done, not while the last batch is still computing (it showed 100%
    twice, tens of seconds apart, on a CPU)."""
    events = []

    class Bar:  # records what the trainer's bars are told
        def __init__(self, iterable=(), desc="", **options):
            self.iterable, self.desc = iterable, desc

        def __iter__(self):
            return iter(self.iterable)

        def update(self, n):
            events.append((self.desc, n))

        def close(self):
            events.append((self.desc, "closed"))

    def loss_with_a_mark(model, batch, **options):
        loss = causal_lm_loss(model, batch, **options)
        loss.register_hook(lambda grad: events.append("backward"))
        return loss

    causal_lm_loss = train_gsm8k.causal_lm_loss
    monkeypatch.setattr(train_gsm8k, "tqdm", Bar)
    monkeypatch.setattr(train_gsm8k, "causal_lm_loss", loss_with_a_mark)
    initialized(tiny_model_dir, tiny_gsm8k_dir)  # 5 samples in batches of 2, 2, 1
    assert events == [("estimating", 0), "backward", ("estimating", 2), "backward", ("estimating", 2), "backward",
                      ("estimating", 1), ("estimating", "closed")]


def test_eval_only_warns_when_the_adapter_was_trained_on_another_model(stopped_run, tmp_path, tiny_model_dir,
                                                                        tiny_gsm8k_dir, capsys):
    from conftest import write_tiny_llama

    adapter = str(stopped_run[0] / "adapter.safetensors")
    other_model = write_tiny_llama(tmp_path / "other_model", seed=1)
    run(tmp_path, other_model, tiny_gsm8k_dir, "--eval_only", "--adapter", adapter, name="other")
    assert re.search(r"\nwarning: .*adapter.safetensors was trained on .*tiny-llama.*, not on --model .*other_model",
                     capsys.readouterr().out)
    run(tmp_path, f"{tiny_model_dir}/", tiny_gsm8k_dir, "--eval_only", "--adapter", adapter, name="same")
    assert "warning" not in capsys.readouterr().out  # the same folder, spelled with a trailing /, is the same model


def test_learning_rate_schedule_starts_at_lr_1_and_decays_to_zero():
    lrs = [train_gsm8k.learning_rate(step, 1e-4, 4, 100) for step in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4 / 4) and lrs[3] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs[3:], lrs[4:])) and 0 < lrs[-1] < 1e-7  # every step moves, the last barely
    linear = [train_gsm8k.learning_rate(step, 1e-4, 4, 100, "linear") for step in range(1, 101)]
    assert linear[:4] == lrs[:4] and linear[-1] == pytest.approx(1e-4 / 97)  # 97 decay steps, the last above 0
    assert all(b - a == pytest.approx(-1e-4 / 97) for a, b in zip(linear[3:], linear[4:]))  # a straight line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_with_two_cpu_processes(tmp_path, tiny_model_dir, tiny_gsm8k_dir):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO / "train_gsm8k.py"), "--model", str(tiny_model_dir), "--data_dir", str(tiny_gsm8k_dir),
               "--out_dir", str(out), "--device", "cpu", "--batch_size", "4", "--micro_batch_size", "2",
               "--max_steps", "2", "--rank", "4", "--num_init_samples", "6", "--eval_limit", "5",
               "--max_new_tokens", "4", "--quantize", "nf4", "--init_group_gib", str(8192 / 2**30)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "terminate called" not in result.stderr and "FutureWarning" not in result.stderr  # a clean exit
    # on a 4-bit base, the estimate in groups: each pass's sums all-reduced over the two processes
    assert "pass(es)" in result.stdout and "1 pass(es)" not in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quantize"] == "nf4"
    assert summary["gsm8k"]["total"] == 5  # the questions were split over the two ranks and gathered back
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["index"] for p in predictions] == [0, 1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["grad_accum"] == 1


def test_initialize_adapters_is_the_library_estimate_and_svd_bitwise(tiny_model_dir, tiny_gsm8k_dir):
    """The trainer's initialization phase adds nothing of its own: it equals lorasb.estimate_first_update on the
    trainer's init batches (seed + 1, micro batch size) followed by lorasb.add_adapters, bit for bit."""
    import data
    import model as model_lib

    args = train_gsm8k.parse_args(["--model", str(tiny_model_dir), "--data_dir", str(tiny_gsm8k_dir), "--rank", "4",
                                   "--num_init_samples", "5", "--micro_batch_size", "2", "--batch_size", "4",
                                   "--device", "cpu", "--max_steps", "10"])
    setup = train_gsm8k.Setup(False, 0, 1, torch.device("cpu"), torch.float32, torch.float32)
    loaded = train_gsm8k.load(args, setup)
    examples, _ = data.tokenize_dataset(loaded.tokenizer, loaded.pairs, args.max_length)
    plan = train_gsm8k.plan_training(args, len(examples), 1)
    assert plan.num_init_samples == 5 and plan.lr_1 == pytest.approx(args.lr)  # 10 steps: a 1-step warmup

    phase = model_lib.load_model(loaded.folder)
    report = train_gsm8k.initialize_adapters(phase, examples, loaded.tokenizer.pad_id, args, plan, setup)
    direct = model_lib.load_model(loaded.folder)
    batches = data.Batches(examples, 2, args.seed + 1, pad_id=loaded.tokenizer.pad_id)
    updates = lorasb.estimate_first_update(direct, batches, train_gsm8k.causal_lm_loss, 5, plan.lr_1)
    lorasb.add_adapters(direct, "lorasb", 4, updates=updates)
    got, expected = phase.state_dict(), direct.state_dict()
    assert report.method == "lorasb" and got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


# --- MATH, and the switches that reproduce the authors' run -------------------------------------------------------

def canned_generate(tokenizer, completions: dict[str, str], budgets: dict):
    """A stand-in for model.generate: each prompt gets the completion of the question it contains ("" if none), and
    budgets records the max_new_tokens each question was given (None: questions without a completion)."""
    def generate(model, prompts, max_new_tokens, eos_ids, pad_id, stop=None, batch_size=16, progress=True):
        outputs = []
        for prompt in prompts:
            question = next((q for q in completions if q in tokenizer.decode(prompt)), None)
            budgets[question] = max_new_tokens
            outputs.append(tokenizer.encode(completions.get(question, ""), add_special_tokens=False))
        return outputs
    return generate


def test_gsm8k_and_math_are_scored_and_both_accuracies_written(tmp_path, tiny_model_dir, tiny_gsm8k_dir,
                                                               tiny_math_file, monkeypatch):
    completions = dict(zip([q for q, _, _, _ in TINY_MATH],
                           ["Half.\nThe answer is: 0.5", "The answer is: 5.\nDone.", "The answer is: x/3", "No idea."]))
    budgets = {}
    monkeypatch.setattr(train_gsm8k.model_lib, "generate",
                        canned_generate(Tokenizer.from_dir(tiny_model_dir), completions, budgets))
    out, _ = run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--eval_only", "--eval_data", "gsm8k,math", "--math_path",
                 str(tiny_math_file), "--math_max_new_tokens", "7")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["gsm8k"]["total"], summary["gsm8k"]["invalid"]) == (4, 4) and summary["held_out_loss"] > 0
    math = summary["math"]
    assert {k: v for k, v in math.items() if not k.startswith("by_")} == {
        "accuracy": 0.5, "correct": 2, "invalid": 1, "total": 4, "accuracy_authors_fallback": 0.75,
        "changed_by_authors_fallback": 1}  # "x/3" is wrong, but theirs counts it as right
    assert math["by_subject"] == {"Algebra": {"accuracy": 0.5, "correct": 1, "total": 2},
                                  "Prealgebra": {"accuracy": 0.5, "correct": 1, "total": 2}}
    assert math["by_level"] == {"Level 1": {"accuracy": 1.0, "correct": 2, "total": 2},
                                "Level 2": {"accuracy": 0.0, "correct": 0, "total": 2}}
    rows = [json.loads(line) for line in (out / "predictions_math.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["\\frac{1}{2}", "5", "\\frac{x}{3}", "3"]
    assert [r["extracted"] for r in rows] == ["0.5", "5", "x/3", None]
    assert [(r["correct"], r["correct_authors_fallback"]) for r in rows] == [
        (True, True), (True, True), (False, True), (False, False)]
    assert rows[0]["subject"] == "Algebra" and rows[0]["level"] == "Level 1"
    assert budgets[TINY_MATH[0][0]] == 7 and budgets[None] == 6  # MATH's budget and GSM8K's
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4


def test_bad_evaluation_and_switch_arguments_are_refused(tmp_path, tiny_model_dir, tiny_gsm8k_dir, capsys):
    assert "argument --eval_data: 'gsm8k,mathematics': choose test sets among gsm8k, math" in refused_by_argparse(
        capsys, "--eval_data", "gsm8k,mathematics")
    assert "argument --lr_1: must be a positive finite number, got 0" in refused_by_argparse(capsys, "--lr_1", "0")
    assert "argument --eval_merge: invalid choice: 'fp16'" in refused_by_argparse(capsys, "--eval_merge", "fp16")
    with pytest.raises(SystemExit) as refused:
        run(tmp_path, tiny_model_dir, tiny_gsm8k_dir, "--method", "lora", "--init_svd", "authors", "--math_path",
            str(tmp_path / "no"))
    message = str(refused.value)
    for expected in ["--init_svd authors with --method lora: svd='authors' is LoRA-SB's", "--math_path"]:
        assert expected in message


def test_expected_failures_end_with_one_paragraph_and_the_traceback_only_on_request(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    monkeypatch.setenv("LORASB_GSM8K_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens: offline
    monkeypatch.setattr(hub, "CACHE_DIR", tmp_path / "cache")
    offline = functools.partial(train_gsm8k.main, ["--model", str(tiny_model_dir), "--out_dir", str(tmp_path / "run"),
                                                   "--device", "cpu"])
    with pytest.raises(SystemExit) as stopped:
        command.run(offline)
    paragraph = stopped.value.code  # what Python prints on stderr, with exit status 1 (every missing input at once)
    assert paragraph.startswith("Cannot start:\n  - could not download http://127.0.0.1")
    assert "Offline? Put the file" in paragraph and paragraph.endswith("check the connection, or pass local files as "
                                                                       "each line says")
    monkeypatch.setenv("LORASB_TRACEBACK", "1")
    with pytest.raises(hub.DownloadError):
        command.run(offline)
    monkeypatch.delenv("LORASB_TRACEBACK")
    wrong_shapes = functools.partial(torch.nn.functional.cross_entropy, torch.zeros(2, 3), torch.zeros(3).long())
    with pytest.raises(ValueError, match="batch_size"):  # raised inside torch: a bug, whose traceback is kept
        command.run(wrong_shapes)
    with pytest.raises(RuntimeError):
        command.run(functools.partial(torch.zeros(2).view, 3))

    broken = write_tiny_gsm8k(tmp_path / "broken")  # a refused input, as the command line shows it
    (broken / "train.jsonl").write_text("{not json\n")
    result = subprocess.run([sys.executable, str(REPO / "train_gsm8k.py"), "--model", str(tiny_model_dir),
                             "--data_dir", str(broken), "--out_dir", str(tmp_path / "run"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == (f"Stopped: {broken / 'train.jsonl'}:1: not valid JSON (Expecting property name enclosed "
                             f"in double quotes at column 2)\nFix the input it names, then run again. "
                             f"(LORASB_TRACEBACK=1 shows the traceback.)\n")  # the whole of stderr


def initialized(tiny_model_dir, tiny_gsm8k_dir, *extra):
    """A fresh tiny model after the trainer's initialization phase (LoRA-SB rank 4, 5 samples, 10 steps, so lr_1 is
    the peak LR 1e-4), with its examples and plan."""
    args = train_gsm8k.parse_args(["--model", str(tiny_model_dir), "--data_dir", str(tiny_gsm8k_dir), "--rank", "4",
                                   "--num_init_samples", "5", "--micro_batch_size", "2", "--batch_size", "4",
                                   "--device", "cpu", "--max_steps", "10", *extra])
    setup = train_gsm8k.Setup(False, 0, 1, torch.device("cpu"), torch.float32, torch.float32)
    loaded = train_gsm8k.load(args, setup)
    examples, _ = data.tokenize_dataset(loaded.tokenizer, loaded.pairs, args.max_length)
    plan = train_gsm8k.plan_training(args, len(examples), 1)
    model = model_lib.load_model(loaded.folder)
    train_gsm8k.initialize_adapters(model, examples, loaded.tokenizer.pad_id, args, plan, setup)
    return model, examples, plan


def test_lr_1_scales_r_at_init_and_leaves_b_and_a_unchanged(tiny_model_dir, tiny_gsm8k_dir):
    default, _, plan = initialized(tiny_model_dir, tiny_gsm8k_dir)
    scaled, _, scaled_plan = initialized(tiny_model_dir, tiny_gsm8k_dir, "--lr_1", "2.5e-5")
    assert plan.lr_1 == pytest.approx(1e-4) and scaled_plan.lr_1 == 2.5e-5
    for name, adapter in lorasb.adapters(default).items():
        other = scaled.get_submodule(name)
        assert torch.equal(other.B, adapter.B) and torch.equal(other.A, adapter.A)
        # dW = -lr_1 sign(G) scales linearly, and so does its SVD: exactly, since the ratio is a power of two
        assert torch.equal(other.R, adapter.R / 4)


def test_the_authors_svd_and_init_batch_size_are_exactly_theirs(tiny_model_dir, tiny_gsm8k_dir):
    phase, examples, plan = initialized(tiny_model_dir, tiny_gsm8k_dir, "--init_svd", "authors",
                                        "--init_batch_size", "3")
    direct = model_lib.load_model(tiny_model_dir)
    batches = data.Batches(examples, 3, 43, pad_id=256)  # --init_batch_size 3, the estimate's own order (seed + 1)
    updates = lorasb.estimate_first_update(direct, batches, train_gsm8k.causal_lm_loss, 5, plan.lr_1)
    lorasb.add_adapters(direct, "lorasb", 4, updates=updates, svd="authors")
    got, expected = phase.state_dict(), direct.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_eval_merge_bf16_is_the_merged_model_rounded_and_exact_merges_only_in_fp32(tiny_model_dir):
    model = model_lib.load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    updates = {name: torch.randn(m.weight.shape, generator=g) * 1e-2
               for name, m in lorasb.find_targets(model).items()}
    lorasb.add_adapters(model, "lorasb", 4, updates=updates)
    ids = torch.randint(0, 256, (2, 12), generator=g)
    with torch.no_grad():
        unmerged = model(ids)
    fp32 = train_gsm8k.Setup(False, 0, 1, torch.device("cpu"), torch.float32, torch.float32)
    exact, authors = copy.deepcopy(model), copy.deepcopy(model)
    train_gsm8k.prepare_evaluation(exact, argparse.Namespace(eval_merge="exact"), fp32)
    train_gsm8k.prepare_evaluation(authors, argparse.Namespace(eval_merge="bf16"), fp32)
    with torch.no_grad():
        torch.testing.assert_close(exact(ids), unmerged, atol=1e-5, rtol=1e-5)  # merged in fp32: the same function
        rounded = authors(ids)
    # the authors' model is the exactly merged one, every weight rounded to bf16 (the RoPE frequencies stay fp32)
    merged = dict(exact.named_parameters())
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, merged[n].to(torch.bfloat16))
               for n, p in authors.named_parameters())
    assert authors.inv_freq.dtype == torch.float32
    assert not torch.equal(rounded.float(), unmerged)
    torch.testing.assert_close(rounded.float(), unmerged, atol=0.1, rtol=0.05)
    bf16 = train_gsm8k.Setup(False, 0, 1, torch.device("cpu"), torch.bfloat16, torch.bfloat16)
    kept = copy.deepcopy(model)
    train_gsm8k.prepare_evaluation(kept, argparse.Namespace(eval_merge="exact"), bf16)
    assert all(m.merged_base_weight is None for m in lorasb.adapters(kept).values())  # bf16 weights: unmerged


def test_train_is_the_loop_a_caller_records_through_after_step(tiny_model_dir, tiny_gsm8k_dir):
    """train(..., after_step) runs the steps after start_step, calling after_step(step, result) once after each: what
    the experiments call to record their losses (the trainer's own callback is its checkpointer)."""
    model, examples, plan = initialized(tiny_model_dir, tiny_gsm8k_dir, "--max_steps", "3")
    args = train_gsm8k.parse_args(["--model", str(tiny_model_dir), "--micro_batch_size", "2", "--batch_size", "4",
                                   "--device", "cpu", "--max_steps", "3", "--lr", "1e-2"])
    setup = train_gsm8k.Setup(False, 0, 1, torch.device("cpu"), torch.float32, torch.float32)
    batches = data.Batches(examples, args.micro_batch_size, args.seed)
    optimizer = train_gsm8k.make_optimizer(model, args, setup.device)
    recorded = []
    train_gsm8k.train(model, optimizer, batches, args, plan, setup, start_step=1,
                      after_step=lambda step, result: recorded.append((step, result["loss"].item(), result["lr"])))
    assert [step for step, _, _ in recorded] == [2, 3] and all(math.isfinite(loss) for _, loss, _ in recorded)
    assert [lr for _, _, lr in recorded] == [train_gsm8k.learning_rate(s, 1e-2, plan.warmup_steps, 3) for s in (2, 3)]
