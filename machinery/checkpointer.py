"""The trainer's checkpointer: what a run resumes from (or that it starts afresh), and after each optimizer step the
cadence of a run: its metrics every log_every steps, a checkpoint every --save_every steps and at the end, a stop
with a clear message once training diverges, and a stop with a checkpoint when SIGTERM, SIGINT or SIGHUP comes. Also
how a run stops on a signal outside training: at once, saying what was kept and the command that continues. The
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
        self.start_step, self.earlier_seconds = 0, 0.0  # a new run, or what its earlier parts trained and took
        if not self.state:
            return 0
        self.start_step = checkpoints.restore_position(self.state, optimizer, batches, self.setup.device)
        self.earlier_seconds = self.state.get("train_seconds")  # None in a checkpoint that did not record it
        self.setup.log(f"resumed from {self.checkpoint} at step {self.start_step}")
        return self.start_step

    @contextmanager
    def training(self, out: Path, model, optimizer, batches, total_steps: int, log_every: int,
                 signals: "StopOnSignal") -> Iterator[Callable[[int, dict], None]]:
        """While training: the after_step callback, with a signal stopping the run at the next step boundary with a
        checkpoint (signals.deferred), and a progress bar."""
        self.out, self.model, self.optimizer, self.batches = out, model, optimizer, batches
        self.total_steps, self.log_every, self.signals = total_steps, log_every, signals
        self.diverged_at = torch.zeros((), dtype=torch.long, device=self.setup.device)  # first non-finite step
        self.tokens, self.t0 = 0, time.time()
        self.last_log = self.t0
        self.bar = tqdm(initial=self.start_step, total=total_steps, desc="training",
                        disable=not self.setup.master_process)
        with signals.deferred():
            try:
                yield self.after_step
            finally:
                self.bar.close()
            if signals.requested():  # the signal came during the last checkpoint, which is written
                signals.stop(total_steps, out / run_folder.CHECKPOINTS)
        self.train_seconds = time.time() - self.t0

    def timings(self) -> dict:
        """The training time of the whole run, for the summary: of a resumed run, its earlier parts' and this part's
        (also given alone, with the step it resumed at), as far as its checkpoint recorded them."""
        if not self.start_step:
            return {"train_seconds": self.train_seconds}
        whole = None if self.earlier_seconds is None else self.earlier_seconds + self.train_seconds
        return {"train_seconds": whole, "resumed_at_step": self.start_step, "resumed_train_seconds": self.train_seconds}

    def seconds_so_far(self) -> float | None:
        """The training time of the run up to now, its earlier parts included (None if a checkpoint lacked it)."""
        return None if self.earlier_seconds is None else self.earlier_seconds + time.time() - self.t0

    def after_step(self, step: int, result: dict) -> None:
        """After optimizer step `step` (train_step's result): log it every log_every steps and at the end,
        checkpoint it every --save_every steps, at the end and when a signal came, then stop if one did. A NaN or
        inf loss or gradient norm is recorded on the device (no sync per step) and stops the run at the next log or
        save."""
        args, setup = self.args, self.setup
        finite = torch.isfinite(result["loss"]) & torch.isfinite(result["grad_norm"])
        self.diverged_at.masked_fill_((self.diverged_at == 0) & ~finite, step)
        self.tokens += result["tokens"] * setup.ddp_world_size
        stopping = self.signals.requested()
        saving = stopping or step % args.save_every == 0 or step == self.total_steps
        if saving or step % self.log_every == 0:
            self.stop_if_diverged(step, check_weights=saving)
        if step % self.log_every == 0 or step == self.total_steps:
            self.log(step, result)
        if saving:
            if setup.master_process:
                checkpoints.save(self.out, step, self.model, self.optimizer, self.batches, setup.device,
                                 self.seconds_so_far())
            if setup.ddp:
                dist.barrier()
        self.bar.update(1)  # once the step is checkpointed (if due): the bar and a stop's message agree
        if stopping:
            self.bar.close()  # before the message that ends the output
            self.signals.stop(step, self.out / run_folder.CHECKPOINTS)

    def log(self, step: int, result: dict) -> None:
        """The step's metrics (its loss averaged over the processes), to metrics.jsonl and the progress bar."""
        loss = result["loss"]
        if self.setup.ddp:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        now = time.time()
        row = {"step": step, "loss": loss.item(), "lr": result["lr"], "grad_norm": result["grad_norm"].item(),
               "tokens_per_s": self.tokens / (now - self.last_log), "elapsed_s": self.seconds_so_far()}
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
# Stopping on a signal: SIGTERM (what schedulers such as SLURM and Kubernetes send before they kill a job), SIGINT
# (Ctrl-C) or SIGHUP (the terminal or ssh session closed), at any time of a run.
# ---------------------------------------------------------------------------------------------------------------------

class Stopped(BaseException):
    """A signal outside training: it unwinds the run (the lock released, temporary files removed) like Ctrl-C's
    KeyboardInterrupt, and no `except Exception` stops it on its way to StopOnSignal.__exit__."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """For a whole run (main's `with`), SIGTERM, SIGINT and SIGHUP end it with one message that says what was kept
    and the command that continues, and exit status 128 + the signal's number (143, 130, 129), as schedulers expect.

    Outside training the run stops at once: the handler raises Stopped, which __exit__ turns into the message. During
    training (deferred()) a signal only records that the run should stop: the checkpointer asks requested() at each
    step boundary, checkpoints that step, then calls stop(). A second signal exits at once; the checkpoints written
    before it are intact."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    # Copies of one notice arrive together: under torchrun a worker gets Ctrl-C's SIGINT (or the scheduler's SIGTERM)
    # and the copy torchrun forwards to it. Only a signal this much later is a second one.
    SAME_NOTICE_S = 1.0

    def __init__(self, command: "RunCommand", master: bool = True):
        self.command, self.master = command, master
        self.received = 0  # the signal this process got
        self.received_at = 0.0  # when (time.monotonic)
        self.agreed = 0  # the signal that stops every process
        self.deferring = False  # in training: wait for the step boundary
        self.trained = False  # training ended: the checkpoint of its last step is written
        self.previous = {}

    def __enter__(self) -> "StopOnSignal":
        self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if isinstance(error, Stopped):
            if self.master:
                say(f"\n{self.kept(error.signum)}\n")
            raise SystemExit(128 + error.signum) from None

    def handle(self, signum: int, frame) -> None:
        """In training only record the signal (the step in progress finishes), elsewhere stop (raise Stopped); at a
        second signal exit at once."""
        name = signal.Signals(signum).name
        if self.received:
            if time.monotonic() - self.received_at > self.SAME_NOTICE_S:
                say(f"\n{name} again: stopping at once, without a checkpoint of this step\n")
                os._exit(128 + signum)
            return
        self.received, self.received_at = signum, time.monotonic()
        if not self.deferring:
            raise Stopped(signum)
        say(f"\n{name}: the run stops after this step, with a checkpoint (a second signal stops it at once)\n")

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """While training: a signal waits for the step boundary. Once training has ended, the run can resume."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        self.trained = True

    def requested(self) -> bool:
        """Whether the run stops at this step boundary: under torchrun every process learns of a signal any got."""
        self.agreed = distributed.largest(self.received)
        return bool(self.agreed)

    def stop(self, step: int, folder: Path) -> NoReturn:
        """Exit, once the checkpoint of `step` is written, saying (process 0) how to continue."""
        if self.master:
            say(f"\nStopped at step {step} by {signal.Signals(self.agreed).name}: its checkpoint is in {folder}. To "
                f"continue the run:\n  {self.command.resume()}\n")
        sys.exit(128 + self.agreed)

    def kept(self, signum: int) -> str:
        """What a signal outside training leaves, and the command that goes on from there."""
        name, folder = signal.Signals(signum).name, self.command.out / run_folder.CHECKPOINTS
        if self.command.eval_only:
            return f"Stopped by {name} before the evaluation ended: nothing of it is kept. To run it again:\n  " \
                   f"{self.command.again()}"
        if self.trained:
            return f"Stopped by {name} after training, before its outputs were all written: the checkpoint of its " \
                   f"last step is in {folder}. To write them (the run resumes at its end):\n  {self.command.resume()}"
        if self.command.resuming:
            return f"Stopped by {name} before training resumed: the checkpoints in {folder} are as they were. To " \
                   f"continue the run:\n  {self.command.resume()}"
        return f"Stopped by {name} before training began: nothing of this run is kept. To start it again:\n  " \
               f"{self.command.again()}"


def say(message: str) -> None:
    """Write to stderr with os.write, not print: a signal may have interrupted a print. After SIGHUP the terminal may
    be gone; the run still stops as it should, unheard."""
    try:
        os.write(2, message.encode())
    except OSError:
        pass


class RunCommand:
    """The command a run was started with, and those that go on once it stopped."""

    def __init__(self, script: str, argv: list[str] | None, processes: int, args):
        self.script, self.argv, self.processes = script, sys.argv[1:] if argv is None else argv, processes
        self.out, self.eval_only, self.resuming = Path(args.out_dir), args.eval_only, args.resume

    def resume(self) -> str:
        return resume_command(self.script, self.argv, self.processes)

    def again(self) -> str:
        """The command that starts the run anew: its arguments less --resume, with --overwrite when the out_dir holds
        anything but its lock (what the stopped run wrote)."""
        kept = [arg for arg in self.argv if not abbreviates(arg, "--resume")]
        if self.out.is_dir() and any(p.name != run_folder.LOCK for p in self.out.iterdir()) and \
                not any(abbreviates(arg, "--overwrite") for arg in kept):
            kept.append("--overwrite")
        return launched(self.script, kept, self.processes)


def resume_command(script: str, argv: list[str] | None, processes: int) -> str:
    """The command that continues this run from its checkpoints: its arguments (argv, or the command line's), with
    --resume in place of --overwrite (argparse also takes either abbreviated)."""
    argv = sys.argv[1:] if argv is None else argv
    kept = [arg for arg in argv if not abbreviates(arg, "--overwrite")]
    if not any(abbreviates(arg, "--resume") for arg in kept):
        kept.append("--resume")
    return launched(script, kept, processes)


def launched(script: str, argv: list[str], processes: int) -> str:
    launcher = "python" if processes == 1 else "torchrun [the same torchrun options]"
    return f"{launcher} {shlex.join([os.path.relpath(script), *argv])}"


def abbreviates(arg: str, option: str) -> bool:
    """Whether argparse reads `arg` as `option` (an unambiguous prefix: "--ov" for --overwrite, "--re" for --resume)."""
    return len(arg) > 3 and option.startswith(arg)
