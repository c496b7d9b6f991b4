"""The trainer's checkpoints, and resuming from them without ever continuing a different run or a damaged file.

<out_dir>/checkpoints/ holds, once per run, run.json (what a resumed run must share with this one, and the sha256 of
initial_adapter.safetensors) and initial_adapter.safetensors (the adapter as initialized: B and A never change after
it), then one folder per checkpoint: trainable.safetensors (what trains: R; B and A for LoRA; every weight for full
fine-tuning), state.pt (optimizer, data position, torch RNG states, training time so far) and manifest.json (the
sha256 of both and of run.json, written last). A folder is written under a temporary name and renamed into place,
then checkpoints/latest names it; the newest two are kept (an older one is renamed to a temporary name, then
deleted). resume_state verifies the chain of hashes before the model loads, and falls back to the previous
checkpoint when the latest is damaged.
What makes a resumed run the same run is machinery/run_identity.py; when checkpoints are written (and the run stops on
a signal or a divergence) is machinery/checkpointer.py.
"""

import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

import lorasb
from machinery import run_folder
from machinery.command import refuse, remedy, why_not_written
from machinery.files import atomic_write, sha256_file
from machinery.input_files import read_json_object
from machinery.run_identity import check_same_run

CHECKPOINT_FILES = ("trainable.safetensors", "state.pt")


# ---------------------------------------------------------------------------------------------------------------------
# Writing: once before the first step, then a checkpoint every --save_every steps.
# ---------------------------------------------------------------------------------------------------------------------

def write_run_record(out: Path, model, identity: dict, method: str, base_model: str) -> None:
    """Before the first step of a run: checkpoints/initial_adapter.safetensors (not for full fine-tuning), then
    run.json with its sha256, so that checkpoints store only what trains."""
    folder = out / run_folder.CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    record = dict(identity)
    if method != "full":
        lorasb.save_adapter(model, folder / "initial_adapter.safetensors", method, base_model)
        record["initial_adapter sha256"] = sha256_file(folder / "initial_adapter.safetensors")
    run_folder.write_json(folder / "run.json", record)


def save(out: Path, step: int, model, optimizer, batches, device: torch.device,
         train_seconds: float | None = None) -> None:
    """Checkpoint `step`: what trains, the optimizer, the data position (batches.state_dict()), the torch RNG
    states and the training time of the run so far, with their manifest. On a full disk (or any failed write) the
    run stops with the free space, the previous checkpoints intact."""
    folder = out / run_folder.CHECKPOINTS
    name = f"step-{step:07d}"
    tmp = folder / f"{run_folder.INTERRUPTED_FOLDER}{name}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lorasb.save_safetensors(tmp / "trainable.safetensors",
                                {n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
        state = {"step": step, "optimizer": optimizer.state_dict(), "data": batches.state_dict(),
                 "rng": rng_states(device), "train_seconds": train_seconds}
        atomic_write(tmp / "state.pt", lambda f: torch.save(state, f))
        hashes = {f"{name}/{file}": sha256_file(tmp / file) for file in CHECKPOINT_FILES}
        run_folder.write_json(tmp / "manifest.json", {"step": step, "sha256": {
            **hashes, "run.json": sha256_file(folder / "run.json")}})
        shutil.rmtree(folder / name, ignore_errors=True)
        os.replace(tmp, folder / name)
        atomic_write(folder / "latest", lambda f: f.write(name.encode()))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"Stopped at step {step}: its checkpoint could not be written to {folder}: "
                 f"{why_not_written(e, folder)}. The previous checkpoints are intact: {remedy(e)}, then run again "
                 f"with --resume.")
    # Keep this one and the one before it (a fallback should this one be damaged later); drop older ones, and any
    # of a later step, left by a run that was resumed from an earlier checkpoint. Each is renamed first: a kill while
    # it is deleted leaves a temporary folder (removed at the next start), never a partial checkpoint.
    kept = {name, *sorted(p.name for p in folder.glob("step-*") if p.name < name)[-1:]}
    for old in folder.glob("step-*"):
        if old.name not in kept:
            doomed = folder / f"{run_folder.INTERRUPTED_FOLDER}pruned-{old.name}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed)


def rng_states(device: torch.device) -> dict:
    """torch's RNG states (on CUDA, this process's device only): what the run could draw from."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


# ---------------------------------------------------------------------------------------------------------------------
# Resuming: the newest intact checkpoint, checked before the model loads.
# ---------------------------------------------------------------------------------------------------------------------

def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None: its manifest.json must list its files and run.json, each with
    the sha256 it has now. Only regular files are read (a FIFO put there would block the run forever)."""
    try:
        manifest = read_json_object(folder / "manifest.json")
        listed = manifest["sha256"]
        expected = {f"{folder.name}/{file}" for file in CHECKPOINT_FILES} | {"run.json"}
        if not isinstance(listed, dict) or set(listed) != expected:
            return f"its manifest.json lists {sorted(listed)}, not {sorted(expected)}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable manifest.json ({type(e).__name__}: {e})"
    if manifest.get("step") != step_of(folder.name):
        return f"its manifest.json is of step {manifest.get('step')!r}, not of {folder.name}"
    for file, sha256 in listed.items():
        path = folder.parent / file
        if not path.is_file():
            return f"{file} is missing"
        if sha256_file(path) != sha256:
            return f"{file} is damaged (its sha256 differs from the manifest's)"
    return None


def step_of(name: str) -> int | None:
    """The step a checkpoint folder's name says (step-0000042: 42); None for another name."""
    digits = name.removeprefix("step-")
    return int(digits) if digits.isdigit() else None


def resume_state(out: Path, identity: dict, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The newest intact checkpoint's folder and its state (step, optimizer, data position, RNG): the one
    checkpoints/latest names, else the others from the newest, falling back with a message (through `log`) past any
    whose files do not match their manifest. Refuses when the run's settings, process count, dtype, data or model
    differ from the checkpoint's (run.json), or when no checkpoint is intact."""
    folder = out / run_folder.CHECKPOINTS
    if (folder / "latest").exists() and not (folder / "latest").is_file():
        refuse([f"cannot resume: {folder / 'latest'} is not a file (the trainer keeps there the name of the newest "
                f"checkpoint, and could not write it): move it out of {folder}, then run again with --resume"])
    names = sorted((p.name for p in folder.glob("step-*") if p.is_dir()), reverse=True)
    latest = (folder / "latest").read_text(errors="replace").strip() if (folder / "latest").is_file() else None
    damaged = []
    for name in sorted(names, key=lambda n: n != latest):  # latest first, then newest first
        wrong = checkpoint_problem(folder / name)
        if wrong is None:
            try:
                state = torch.load(folder / name / "state.pt", weights_only=True, map_location="cpu")
                wrong = ("state.pt lacks keys" if not {"step", "optimizer", "data", "rng"} <= set(state) else
                         f"state.pt is of step {state['step']!r}, not of {name}" if state["step"] != step_of(name) else
                         None)
            except Exception as e:  # noqa: BLE001 - any failure to read it means the same: not this checkpoint
                wrong = f"state.pt cannot be read ({type(e).__name__}: {e})"
        if wrong:
            damaged.append(f"{name}: {wrong}")
            continue
        if damaged:
            log(f"warning: skipping damaged checkpoints ({'; '.join(damaged)}); resuming from {name}")
        check_same_run(folder, identity)
        return folder / name, state
    refuse([f"cannot resume: no intact checkpoint in {folder} ({'; '.join(damaged) or 'none was written'}). Start over "
            f"with --overwrite (it deletes them), or choose another --out_dir"])


def restore_trainable(model, checkpoint: Path, method: str) -> None:
    """The trained weights of a checkpoint: an adapter as initialized (B and A come from sampled data and an SVD: they
    are reloaded, never re-estimated), then the checkpoint's values of what trains."""
    if method != "full":
        lorasb.load_adapter(model, checkpoint.parent / "initial_adapter.safetensors")
    tensors, _ = lorasb.load_safetensors(checkpoint / "trainable.safetensors")
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    mismatched = sorted(name for name in tensors.keys() | trainable.keys()
                        if name not in tensors or name not in trainable or tensors[name].shape != trainable[name].shape)
    if mismatched:
        refuse([f"cannot resume: {checkpoint / 'trainable.safetensors'} does not fit the model ({mismatched[:3]})"])
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[name])


def restore_position(state: dict, optimizer, batches, device: torch.device) -> int:
    """Put the optimizer, the data order and the RNGs where the checkpoint left them; returns its step."""
    optimizer.load_state_dict(state["optimizer"])
    batches.load_state_dict(state["data"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    return state["step"]


