"""machinery/checkpoints.py, run_identity.py and checkpointer.py on a small module and its optimizer: resume edge
cases, the pruning of old checkpoints, the resume command and signals (the trainer's end-to-end checkpoint tests are
in test_train.py)."""

import argparse
import json
import os
import re
import shlex
import shutil
import signal

import pytest
import torch

from conftest import deadline, write_tiny_llama
from machinery import checkpointer, checkpoints, run_folder, run_identity
from machinery.files import sha256_file

IDENTITY = {"settings": {"seed": 1}, "processes": 1}


class Position:
    """What data.Batches gives a checkpoint: its position in the data."""

    def state_dict(self) -> dict:
        return {"epoch": 0, "batch": 3}


def checkpointed(out, steps) -> tuple:
    """A full fine-tuning run of a small module in `out`, checkpointed at each of `steps`; its checkpoints folder."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoints.write_run_record(out, model, IDENTITY, "full", "base")
    for step in steps:
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        checkpoints.save(out, step, model, optimizer, Position(), torch.device("cpu"))
    return out / run_folder.CHECKPOINTS


def rehash(checkpoint) -> None:
    """Rewrite a checkpoint's manifest for the files it holds now, as someone who copied a file in would."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    for file in checkpoints.CHECKPOINT_FILES:
        manifest["sha256"][f"{checkpoint.name}/{file}"] = sha256_file(checkpoint / file)
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_a_state_file_of_another_step_is_skipped_then_refused(tmp_path):
    folder = checkpointed(tmp_path, [1, 2])
    shutil.copy(folder / "step-0000001" / "state.pt", folder / "step-0000002" / "state.pt")
    rehash(folder / "step-0000002")
    logged = []
    checkpoint, state = checkpoints.resume_state(tmp_path, IDENTITY, logged.append)
    assert checkpoint.name == "step-0000001" and state["step"] == 1
    assert "skipping damaged checkpoints (step-0000002: state.pt is of step 1, not of step-0000002)" in logged[0]
    shutil.rmtree(folder / "step-0000001")
    with pytest.raises(SystemExit, match="no intact checkpoint .*state.pt is of step 1, not of step-0000002"):
        checkpoints.resume_state(tmp_path, IDENTITY, logged.append)


def test_a_manifest_of_another_step_is_skipped(tmp_path):
    folder = checkpointed(tmp_path, [1, 2])
    manifest = json.loads((folder / "step-0000002" / "manifest.json").read_text())
    (folder / "step-0000002" / "manifest.json").write_text(json.dumps({**manifest, "step": 1}))
    logged = []
    assert checkpoints.resume_state(tmp_path, IDENTITY, logged.append)[0].name == "step-0000001"
    assert "step-0000002: its manifest.json is of step 1, not of step-0000002" in logged[0]


def test_a_missing_initial_adapter_is_refused_clearly(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    run_folder.write_json(folder / "run.json", {**IDENTITY, "initial_adapter sha256": "0" * 64})
    with pytest.raises(SystemExit, match=r"cannot resume: .*initial_adapter.safetensors is missing, and every "
                                         r"checkpoint needs it .*restore it, or start over with --overwrite"):
        run_identity.check_same_run(folder, IDENTITY)


def test_latest_replaced_by_a_folder_is_refused_with_what_to_do(tmp_path):
    folder = checkpointed(tmp_path, [1])
    (folder / "latest").unlink()
    (folder / "latest").mkdir()
    with pytest.raises(SystemExit, match=r"latest is not a file .*: move it out of .*checkpoints, then run again with "
                                         r"--resume") as refused:
        checkpoints.resume_state(tmp_path, IDENTITY, print)
    assert "make room" not in str(refused.value)


def test_a_kill_while_pruning_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    folder = checkpointed(tmp_path, [1, 2])
    real_rmtree = shutil.rmtree

    def killed_halfway(path, *args, **kwargs):
        if path.name.endswith("step-0000001") and path.exists():  # the oldest, pruned by the checkpoint of step 3
            next(p for p in path.iterdir()).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpointed(tmp_path, [3])
    monkeypatch.setattr(checkpoints.shutil, "rmtree", real_rmtree)
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert all(checkpoints.checkpoint_problem(folder / name) is None for name in ("step-0000002", "step-0000003"))
    removed = run_folder.remove_interrupted_writes(tmp_path, (run_folder.CHECKPOINTS,))
    assert removed == [str(folder / ".tmp-pruned-step-0000001")]


def test_the_resume_command_is_the_run_s_with_resume_in_place_of_overwrite():
    argv = ["--out_dir", "runs/a b", "--overwrite", "--lr", "1e-4"]
    command = checkpointer.resume_command("train_gsm8k.py", argv, 1)
    assert shlex.split(command) == ["python", "train_gsm8k.py", "--out_dir", "runs/a b", "--lr", "1e-4", "--resume"]
    assert checkpointer.resume_command("train_gsm8k.py", ["--res"], 1) == "python train_gsm8k.py --res"
    assert checkpointer.resume_command("train_gsm8k.py", ["--ov"], 8).startswith("torchrun [the same torchrun options]")


def test_copies_of_one_signal_are_one_notice():
    """Under torchrun a worker gets Ctrl-C's SIGINT and torchrun's forwarded copy together: that is no second signal
    (which would exit at once)."""
    stop = checkpointer.StopOnSignal(checkpointer.RunCommand("train_gsm8k.py", [], 1, argparse.Namespace(
        out_dir="runs/x", eval_only=False, resume=False)))
    with stop.deferred():  # in training
        stop.handle(signal.SIGINT, None)
        stop.handle(signal.SIGINT, None)
    assert stop.received == signal.SIGINT and stop.requested()
    with pytest.raises(checkpointer.Stopped):  # outside training: the run stops at once
        checkpointer.StopOnSignal(stop.command).handle(signal.SIGINT, None)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_among_the_weight_files_is_refused_without_blocking(tmp_path):
    """model_fingerprint reads every *.safetensors of the model folder: a FIFO would block the run forever."""
    folder = write_tiny_llama(tmp_path / "model")
    fingerprint = run_identity.model_fingerprint(folder)
    os.mkfifo(folder / "extra.safetensors")
    with deadline(5), pytest.raises(ValueError, match=f"{re.escape(str(folder / 'extra.safetensors'))} is a FIFO"):
        run_identity.model_fingerprint(folder)
    (folder / "extra.safetensors").unlink()
    assert run_identity.model_fingerprint(folder) == fingerprint
