"""The trainer's checkpoints, and resuming from them without ever continuing a different run or a damaged file.

<out_dir>/checkpoints/ holds, once per run, run.json (what a resumed run must share with this one, and the sha256 of
initial_adapter.safetensors) and initial_adapter.safetensors (the adapter as initialized: B and A never change after
it), then one folder per checkpoint: trainable.safetensors (what trains: R; B and A for LoRA; every weight for full
fine-tuning), state.pt (optimizer, data position, torch RNG states) and manifest.json (the sha256 of both and of
run.json, written last). A folder is written under a temporary name and renamed into place, then checkpoints/latest
names it; the newest two are kept. resume_state verifies the chain of hashes before the model loads, and falls back to
the previous checkpoint when the latest is damaged.
"""

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

import lorasb
from machinery import run_folder
from machinery.distributed import refuse
from machinery.hub import sha256_file

# Settings a resumed run must share with the run it continues (the rest, e.g. --eval_limit, may change).
RESUME_KEYS = ("model", "method", "rank", "lora_alpha", "targets", "train_data", "num_train", "epochs", "max_steps",
               "lr", "warmup_ratio", "weight_decay", "grad_clip", "batch_size", "micro_batch_size", "max_length",
               "seed", "num_init_samples", "init_rule", "init_svd", "init_batch_size", "lr_1")
CHECKPOINT_FILES = ("trainable.safetensors", "state.pt")


# ---------------------------------------------------------------------------------------------------------------------
# Run identity: what makes a resumed run the same run.
# ---------------------------------------------------------------------------------------------------------------------

def canonical_model(model: str) -> str:
    """A --model as it compares: a local folder as its resolved path ("x/" and "./x" are one), a hub name as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def run_identity(args, processes: int, dtype: torch.dtype, data_file: Path, model_folder: Path) -> dict:
    """What a resumed run must share with the run it continues: the settings that shape it (a local --model as its
    resolved path), the number of processes, the dtype of the forward pass, and fingerprints of the training data file
    and of the model folder. Recorded in checkpoints/run.json."""
    settings = {**{key: getattr(args, key) for key in RESUME_KEYS}, "model": canonical_model(args.model)}
    return json.loads(run_folder.strict_json({  # as it reads back from run.json
        "settings": settings, "processes": processes, "dtype": str(dtype).removeprefix("torch."),
        "training data sha256": sha256_file(data_file), "model fingerprint": model_fingerprint(model_folder)}))


def model_fingerprint(folder: Path) -> str:
    """sha256 over a model folder's config.json and tokenizer.json, and over the name, the size and 16 spread blocks of
    64 KiB (the first holds the header) of each weight file: about 1 MiB read even of a 14 GB model, yet any other
    checkpoint of the same architecture (a fine-tune changes every block) gets another fingerprint."""
    h = hashlib.sha256()
    for path in [folder / "config.json", folder / "tokenizer.json", *sorted(folder.glob("*.safetensors"))]:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for offset in sorted({size * i // 16 for i in range(16)}):
                f.seek(offset)
                h.update(f.read(1 << 16))
    return h.hexdigest()


def check_same_run(folder: Path, identity: dict) -> None:
    """Refuse to resume a run whose settings, processes, dtype, training data or model differ from the recorded ones
    (checkpoints/run.json, verified by the manifests), or whose initial adapter is damaged."""
    recorded = json.loads((folder / "run.json").read_text())
    adapter_sha256 = recorded.pop("initial_adapter sha256", None)
    changed = [f"--{key}: {recorded['settings'].get(key)!r} -> {value!r}" for key, value in identity["settings"].items()
               if recorded["settings"].get(key) != value]
    changed += [f"{key}: {recorded.get(key)!r} -> {value!r}" for key, value in identity.items()
                if key != "settings" and recorded.get(key) != value]
    if changed:
        refuse([f"cannot resume: this run differs from the checkpoint's ({'; '.join(changed)}); resume with what it "
                f"had, or start over with --overwrite"])
    if adapter_sha256 and sha256_file(folder / "initial_adapter.safetensors") != adapter_sha256:
        refuse([f"cannot resume: {folder / 'initial_adapter.safetensors'} is damaged (its sha256 differs from "
                f"run.json's), and every checkpoint needs it; start over with --overwrite"])


# ---------------------------------------------------------------------------------------------------------------------
# Writing: once before the first step, then a checkpoint every --save_every steps.
# ---------------------------------------------------------------------------------------------------------------------

def start(out: Path, model, identity: dict, method: str, base_model: str) -> None:
    """Before the first step of a run: checkpoints/initial_adapter.safetensors (not for full fine-tuning), then
    run.json with its sha256, so that checkpoints store only what trains."""
    folder = out / run_folder.CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    record = dict(identity)
    if method != "full":
        lorasb.save_adapter(model, folder / "initial_adapter.safetensors", method, base_model)
        record["initial_adapter sha256"] = sha256_file(folder / "initial_adapter.safetensors")
    run_folder.write_json(folder / "run.json", record)


def save(out: Path, step: int, model, optimizer, batches, device: torch.device) -> None:
    """Checkpoint `step`: what trains, the optimizer, the data position (batches.state_dict()) and the torch RNG
    states, with their manifest. On a full disk (or any failed write) the run stops with the free space, the previous
    checkpoints intact."""
    folder = out / run_folder.CHECKPOINTS
    name = f"step-{step:07d}"
    tmp = folder / f"{run_folder.INTERRUPTED_FOLDER}{name}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        lorasb.save_safetensors(tmp / "trainable.safetensors",
                                {n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
        state = {"step": step, "optimizer": optimizer.state_dict(), "data": batches.state_dict(),
                 "rng": rng_states(device)}
        lorasb.atomic_write(tmp / "state.pt", lambda f: torch.save(state, f))
        hashes = {f"{name}/{file}": sha256_file(tmp / file) for file in CHECKPOINT_FILES}
        run_folder.write_json(tmp / "manifest.json", {"step": step, "sha256": {
            **hashes, "run.json": sha256_file(folder / "run.json")}})
        shutil.rmtree(folder / name, ignore_errors=True)
        os.replace(tmp, folder / name)
        lorasb.atomic_write(folder / "latest", lambda f: f.write(name.encode()))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(f"Stopped at step {step}: its checkpoint could not be written to {folder}: "
                 f"{'the disk is full' if disk_is_full(e) else e} ({shutil.disk_usage(folder).free / 2**20:.0f} MiB "
                 f"free there). The previous checkpoints are intact: make room, then run again with --resume.")
    # Keep this one and the one before it (a fallback should this one be damaged later); drop older ones, and any
    # of a later step, left by a run that was resumed from an earlier checkpoint.
    kept = {name, *sorted(p.name for p in folder.glob("step-*") if p.name < name)[-1:]}
    for old in folder.glob("step-*"):
        if old.name not in kept:
            shutil.rmtree(old)


def rng_states(device: torch.device) -> dict:
    """torch's RNG states (on CUDA, this process's device only): what the run could draw from."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def disk_is_full(e: BaseException | None) -> bool:
    """Whether ENOSPC (or a full quota) is anywhere in an exception's chain."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Resuming: the newest intact checkpoint, checked before the model loads.
# ---------------------------------------------------------------------------------------------------------------------

def problem(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None: its manifest.json must list its files and run.json, each with
    the sha256 it has now."""
    try:
        listed = json.loads((folder / "manifest.json").read_text())["sha256"]
        expected = {f"{folder.name}/{file}" for file in CHECKPOINT_FILES} | {"run.json"}
        if not isinstance(listed, dict) or set(listed) != expected:
            return f"its manifest.json lists {sorted(listed)}, not {sorted(expected)}"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable manifest.json ({type(e).__name__}: {e})"
    for file, sha256 in listed.items():
        path = folder.parent / file
        if not path.is_file():
            return f"{file} is missing"
        if sha256_file(path) != sha256:
            return f"{file} is damaged (its sha256 differs from the manifest's)"
    return None


def resume_state(out: Path, identity: dict, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The newest intact checkpoint's folder and its state (step, optimizer, data position, RNG): the one
    checkpoints/latest names, else the others from the newest, falling back with a message (through `log`) past any
    whose files do not match their manifest. Refuses when the run's settings, process count, dtype, data or model
    differ from the checkpoint's (run.json), or when no checkpoint is intact."""
    folder = out / run_folder.CHECKPOINTS
    names = sorted((p.name for p in folder.glob("step-*") if p.is_dir()), reverse=True)
    latest = (folder / "latest").read_text(errors="replace").strip() if (folder / "latest").is_file() else None
    damaged = []
    for name in sorted(names, key=lambda n: n != latest):  # latest first, then newest first
        wrong = problem(folder / name)
        if wrong is None:
            try:
                state = torch.load(folder / name / "state.pt", weights_only=True, map_location="cpu")
                wrong = None if {"step", "optimizer", "data", "rng"} <= set(state) else "state.pt lacks keys"
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
