"""The trainer's checkpoints, and resuming from them without ever continuing a different run or a damaged file.

<out_dir>/checkpoints/ holds, once per run, run.json (what a resumed run must share with this one, and the sha256 of
initial_adapter.safetensors) and initial_adapter.safetensors (the adapter as initialized: B and A never change after
it), then one folder per checkpoint: trainable.safetensors (what trains: R; B and A for LoRA; every weight for full
fine-tuning), state.pt (optimizer, data position, torch RNG states) and manifest.json (the sha256 of both and of
run.json, written last). A folder is written under a temporary name and renamed into place, then checkpoints/latest
names it; the newest two are kept (an older one is renamed to a temporary name, then deleted). resume_state verifies
the chain of hashes before the model loads, and falls back to the previous checkpoint when the latest is damaged.
SIGTERM or SIGINT during training stops the run at the next step boundary with a checkpoint (StopOnSignal).
"""

import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import torch

import lorasb
from machinery import distributed, run_folder
from machinery.distributed import refuse
from machinery.files import atomic_write, sha256_file
from machinery.input_files import regular_file

# Settings a resumed run must share with the run it continues (the rest, e.g. --eval_limit, may change).
RESUME_KEYS = ("model", "method", "rank", "lora_alpha", "targets", "train_data", "num_train", "epochs", "max_steps",
               "lr", "warmup_ratio", "weight_decay", "grad_clip", "batch_size", "micro_batch_size", "max_length",
               "seed", "num_init_samples", "init_rule", "init_svd", "init_batch_size", "lr_1", "schedule",
               "commonsense_prompt")
CHECKPOINT_FILES = ("trainable.safetensors", "state.pt")
# The files of a model folder besides its weights whose content changes what is trained: the architecture, and the
# tokenizer with its special tokens (the EOS that ends every training response, the padding).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------------------------------
# Run identity: what makes a resumed run the same run.
# ---------------------------------------------------------------------------------------------------------------------

def canonical_model(model: str) -> str:
    """A --model as it compares: a local folder as its resolved path ("x/" and "./x" are one), a hub name as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def run_identity(args, processes: int, dtype: torch.dtype, data_files: list[Path], model_folder: Path) -> dict:
    """What a resumed run must share with the run it continues: the settings that shape it (a local --model as its
    resolved path), the number of processes, the dtype of the forward pass, the sha256 of each training data file and
    of each of the model folder's MODEL_FILES (one key per file, so that a refusal names it), the EOS ids of
    generation_config.json (where the run's evaluation stops generating) and a fingerprint of the weights. Recorded in
    checkpoints/run.json."""
    settings = {**{key: getattr(args, key) for key in RESUME_KEYS}, "model": canonical_model(args.model)}
    files = {f"{name} sha256": sha256_file(model_folder / name) if (model_folder / name).is_file() else None
             for name in MODEL_FILES}
    generation = model_folder / "generation_config.json"
    generation_eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    data = {f"{path.parent.name}/{path.name}": sha256_file(path) for path in data_files}  # named like piqa/train.json
    return json.loads(run_folder.strict_json({  # as it reads back from run.json
        "settings": settings, "processes": processes, "dtype": str(dtype).removeprefix("torch."),
        "training data sha256": data, **files,
        "generation_config.json eos_token_id": generation_eos, "model fingerprint": model_fingerprint(model_folder)}))


def model_fingerprint(folder: Path) -> str:
    """sha256 over the name, the size and 16 spread blocks of 64 KiB (the first holds the header) of each weight file
    of a model folder: about 1 MiB read even of a 14 GB model, yet any other checkpoint of the same architecture (a
    fine-tune changes every block) gets another fingerprint. A *.safetensors that is no regular file (a FIFO, which
    would block the run forever) is a ValueError naming it, found without opening it."""
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        size = regular_file(path).st_size
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
    initial = folder / "initial_adapter.safetensors"
    if adapter_sha256 and not (initial.is_file() and sha256_file(initial) == adapter_sha256):
        what = "damaged (its sha256 differs from run.json's)" if initial.is_file() else "missing"
        refuse([f"cannot resume: {initial} is {what}, and every checkpoint needs it (B and A as initialized); "
                f"restore it, or start over with --overwrite"])


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
                 f"{why_not_written(e, folder)}. The previous checkpoints are intact: {what_to_do(e)}, then run again "
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


def why_not_written(e: BaseException, folder: Path) -> str:
    """A failed write, said plainly: the disk is full (with the free space), or the error."""
    free = shutil.disk_usage(folder).free / 2**20
    return f"{'the disk is full' if disk_is_full(e) else e} ({free:.0f} MiB free there)"


def what_to_do(e: BaseException) -> str:
    return "make room" if disk_is_full(e) else "fix that"


@contextmanager
def stop_if_a_write_fails(out: Path, resumable: bool) -> Iterator[None]:
    """The outputs written after training (the adapter, its PEFT export or the model folder, the predictions,
    summary.json): a write that fails (a full disk) stops the run with one message, not a traceback. The checkpoints
    stay as they are, so --resume redoes the end; an --eval_only run is run again."""
    try:
        yield
    except OSError as e:
        again = ("run again with --resume: it writes them from the last checkpoint (which is intact)" if resumable
                 else "run again with --overwrite")
        sys.exit(f"Stopped: the outputs could not be written to {out}: {why_not_written(e, out)}. "
                 f"{what_to_do(e).capitalize()}, then {again}.")


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
        manifest = json.loads((folder / "manifest.json").read_text())
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
        wrong = problem(folder / name)
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


# ---------------------------------------------------------------------------------------------------------------------
# Stopping on a signal: SIGTERM (what schedulers such as SLURM and Kubernetes send before they kill a job) or SIGINT
# (Ctrl-C) during training.
# ---------------------------------------------------------------------------------------------------------------------

class StopOnSignal:
    """While training (inside `with`), SIGTERM and SIGINT only record that the run should stop: the training loop
    asks requested() at each step boundary, checkpoints that step, then calls stop(), which says how to resume and
    exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT). A second signal exits at once; the
    checkpoints written before it are intact."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    # Copies of one notice arrive together: under torchrun a worker gets Ctrl-C's SIGINT (or the scheduler's SIGTERM)
    # and the copy torchrun forwards to it. Only a signal this much later is a second one.
    SAME_NOTICE_S = 1.0

    def __init__(self, resume_command: str):
        self.resume_command = resume_command
        self.received = 0  # the signal this process got
        self.received_at = 0.0  # when (time.monotonic)
        self.agreed = 0  # the signal that stops every process
        self.previous = {}

    def __enter__(self) -> "StopOnSignal":
        self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum: int, frame) -> None:
        """Only record the signal (the step in progress finishes); at a second one, exit at once. os.write, not
        print: the signal may have interrupted a print."""
        name = signal.Signals(signum).name
        if self.received:
            if time.monotonic() - self.received_at > self.SAME_NOTICE_S:
                os.write(2, f"\n{name} again: stopping at once, without a checkpoint of this step\n".encode())
                os._exit(128 + signum)
            return
        self.received, self.received_at = signum, time.monotonic()
        os.write(2, f"\n{name}: the run stops after this step, with a checkpoint (a second signal stops it at once)"
                    f"\n".encode())

    def requested(self) -> bool:
        """Whether the run stops at this step boundary: under torchrun every process learns of a signal any got."""
        self.agreed = distributed.largest(self.received)
        return bool(self.agreed)

    def stop(self, step: int, folder: Path, master: bool) -> NoReturn:
        """Exit, once the checkpoint of `step` is written, saying (process 0) how to continue."""
        if master:
            print(f"\nStopped at step {step} by {signal.Signals(self.agreed).name}: its checkpoint is in {folder}. "
                  f"To continue the run:\n  {self.resume_command}", file=sys.stderr, flush=True)
        sys.exit(128 + self.agreed)


def resume_command(script: str, argv: list[str] | None, processes: int) -> str:
    """The command that continues this run from its checkpoints: its arguments (argv, or the command line's), with
    --resume in place of --overwrite (argparse also takes either abbreviated)."""
    argv = sys.argv[1:] if argv is None else argv
    kept = [arg for arg in argv if not abbreviates(arg, "--overwrite")]
    if not any(abbreviates(arg, "--resume") for arg in kept):
        kept.append("--resume")
    launcher = "python" if processes == 1 else "torchrun [the same torchrun options]"
    return f"{launcher} {shlex.join([os.path.relpath(script), *kept])}"


def abbreviates(arg: str, option: str) -> bool:
    """Whether argparse reads `arg` as `option` (an unambiguous prefix: "--ov" for --overwrite, "--re" for --resume)."""
    return len(arg) > 3 and option.startswith(arg)
