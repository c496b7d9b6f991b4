"""The trainer's checkpointer: what a run resumes from (or that it starts afresh), and after each optimizer step the
cadence of a run: its metrics every --log_every steps, a checkpoint every --save_every steps and at the end, a stop
with a clear message once training diverges, and a stop with a checkpoint when SIGTERM or SIGINT comes. The
checkpoint files themselves are machinery/checkpoints.py.
"""

import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm

from machinery import checkpoints, command, distributed, run_folder


class Checkpointer:
    """Resume-or-start, then the per-step cadence of train_gsm8k.train (its after_step callback), inside training().

    Made before anything is deleted or loaded: with --resume it finds the newest intact checkpoint of the same run
    (checkpoints.resume_state) or refuses. restore() puts a resumed run's trained weights into the model; a new run
    calls start() once it is initialized (run.json and the adapter as initialized); restore_position() puts the
    optimizer, the data order and the RNGs where the checkpoint left them."""

    def __init__(self, args, setup, identity: dict):
        self.args, self.setup, self.identity = args, setup, identity
        self.checkpoint, self.state = (checkpoints.resume_state(Path(args.out_dir), identity, setup.log) if args.resume
                                       else (None, None))

    def restore(self, model) -> bool:
        """Load the resumed checkpoint's trained weights into the model; False when the run starts afresh."""
        if self.checkpoint:
            checkpoints.restore_trainable(model, self.checkpoint, self.args.method)
        return self.checkpoint is not None

    def start(self, out: Path, model) -> None:
        """Before the first step of a new run: run.json and the adapter as initialized (process 0)."""
        if self.setup.master_process:
            with command.stop_if_a_write_fails(out, resumable=False, what="the run record (checkpoints/run.json and "
                                               "the adapter as initialized), before the first step,"):
                checkpoints.write_run_record(out, model, self.identity, self.args.method, self.args.model)

    def restore_position(self, optimizer, batches) -> int:
        """The step the run continues from (0 for a new run), the optimizer, data order and RNGs put back there."""
        if not self.state:
            return 0
        step = checkpoints.restore_position(self.state, optimizer, batches, self.setup.device)
        self.setup.log(f"resumed from {self.checkpoint} at step {step}")
        return step

    @contextmanager
    def training(self, out: Path, model, optimizer, batches, total_steps: int, start_step: int,
                 resume_command: str) -> Iterator[Callable[[int, dict], None]]:
        """While training: the after_step callback, with SIGTERM and SIGINT stopping the run at the next step
        boundary with a checkpoint, and a progress bar."""
        self.out, self.model, self.optimizer, self.batches = out, model, optimizer, batches
        self.total_steps = total_steps
        self.diverged_at = torch.zeros((), dtype=torch.long, device=self.setup.device)  # first non-finite step
        self.tokens, self.t0 = 0, time.time()
        self.last_log = self.t0
        self.bar = tqdm(initial=start_step, total=total_steps, desc="training", disable=not self.setup.master_process)
        with StopOnSignal(resume_command) as self.signals:
            try:
                yield self.after_step
            finally:
                self.bar.close()
            if self.signals.requested():  # the signal came during the last checkpoint, which is written
                self.signals.stop(total_steps, out / run_folder.CHECKPOINTS, self.setup.master_process)

    def after_step(self, step: int, result: dict) -> None:
        """After optimizer step `step` (train_step's result): log it every --log_every steps and at the end,
        checkpoint it every --save_every steps, at the end and when a signal came, then stop if one did. A NaN or
        inf loss or gradient norm is recorded on the device (no sync per step) and stops the run at the next log or
        save."""
        args, setup = self.args, self.setup
        self.bar.update(1)
        finite = torch.isfinite(result["loss"]) & torch.isfinite(result["grad_norm"])
        self.diverged_at.masked_fill_((self.diverged_at == 0) & ~finite, step)
        self.tokens += result["tokens"] * setup.ddp_world_size
        stopping = self.signals.requested()
        saving = stopping or step % args.save_every == 0 or step == self.total_steps
        if saving or step % args.log_every == 0:
            self.stop_if_diverged(step, check_weights=saving)
        if step % args.log_every == 0 or step == self.total_steps:
            self.log(step, result)
        if saving:
            if setup.master_process:
                checkpoints.save(self.out, step, self.model, self.optimizer, self.batches, setup.device)
            if setup.ddp:
                dist.barrier()
        if stopping:
            self.bar.close()  # before the message that ends the output
            self.signals.stop(step, self.out / run_folder.CHECKPOINTS, setup.master_process)

    def log(self, step: int, result: dict) -> None:
        """The step's metrics (its loss averaged over the processes), to metrics.jsonl and the progress bar."""
        loss = result["loss"]
        if self.setup.ddp:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        now = time.time()
        row = {"step": step, "loss": loss.item(), "lr": result["lr"], "grad_norm": result["grad_norm"].item(),
               "tokens_per_s": self.tokens / (now - self.last_log), "elapsed_s": now - self.t0}
        self.tokens, self.last_log = 0, now
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if self.setup.master_process:
            run_folder.append_jsonl(self.out / "metrics.jsonl", row)

    def stop_if_diverged(self, step: int, check_weights: bool) -> None:
        """Stop the run with a clear message, before anything more is saved, once a step's loss or gradient norm was
        NaN or inf (the weights that train then are, or soon will be), or, with check_weights (before a save), when
        a weight the optimizer trains is. The checkpoints already written stay as they are."""
        if self.setup.ddp:
            dist.all_reduce(self.diverged_at, op=dist.ReduceOp.MAX)
        first = int(self.diverged_at.item())
        if not first and check_weights:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            first = 0 if torch.stack([torch.isfinite(p).all() for p in params]).all() else step
        if first:  # every process stops; process 0 says why
            self.bar.close()
            sys.exit(f"Stopped at step {step}: training diverged (the loss, the gradient norm or the weights became "
                     f"NaN or inf at step {first}). Nothing from step {first} on was saved; the checkpoints in "
                     f"{self.out / run_folder.CHECKPOINTS} are as they were. Start over with a lower --lr (this run: "
                     f"{self.args.lr:g}) and --overwrite." if self.setup.master_process else 1)


# ---------------------------------------------------------------------------------------------------------------------
# Stopping on a signal: SIGTERM (what schedulers such as SLURM and Kubernetes send before they kill a job) or SIGINT
# (Ctrl-C) during training.
# ---------------------------------------------------------------------------------------------------------------------

class StopOnSignal:
    """While training (inside `with`), SIGTERM and SIGINT only record that the run should stop: the checkpointer
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
