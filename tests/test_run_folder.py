"""machinery/run_folder.py: strict JSON, the lock that keeps one run per --out_dir, and what --overwrite and the
cleanup of interrupted writes remove (the trainer's end-to-end tests in test_train.py cover the rest)."""

import os
import subprocess
import sys

import pytest

import lorasb
from conftest import REPO
from machinery import run_folder

OUTPUTS = ("config.json", "summary.json", "adapter.safetensors", "peft_adapter", run_folder.CHECKPOINTS)


def test_json_outputs_are_strict():
    assert run_folder.strict_json({"loss": float("nan"), "rows": [float("inf"), 1.5]}) == \
        '{"loss": null, "rows": [null, 1.5]}'


def touch(*paths) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_remove_interrupted_writes_takes_the_trainer_s_temporaries_only(tmp_path):
    lorasb.atomic_write(tmp_path / "summary.json", lambda f: f.write(b"{}"))
    temporary = [tmp_path / ".summary.json.a1b2c3d4.tmp", tmp_path / "checkpoints" / ".run.json.zz_9x8w7.tmp",
                 tmp_path / "peft_adapter" / ".adapter_model.safetensors.q1w2e3r4.tmp"]
    kept = [tmp_path / "summary.json", tmp_path / ".notes.tmp", tmp_path / "checkpoints" / "x.a1b2c3d4.tmp",
            tmp_path / "notes" / ".draft.abcd1234.tmp", tmp_path / ".draft.abcd1234.tmp",
            tmp_path / "notes" / ".tmp-step-0000004" / "mine.txt"]  # a user's files that look like the trainer's
    touch(*temporary, *kept[1:], tmp_path / "checkpoints" / ".tmp-step-0000004" / "state.pt")
    removed = run_folder.remove_interrupted_writes(tmp_path, OUTPUTS)
    assert sorted(removed) == sorted(map(str, [tmp_path / "checkpoints" / ".tmp-step-0000004", *temporary]))
    assert all(p.exists() for p in kept) and (tmp_path / "checkpoints").is_dir()


def test_overwrite_removes_every_output_of_the_previous_run_and_nothing_else(tmp_path):
    outputs = [tmp_path / "config.json", tmp_path / "adapter.safetensors", tmp_path / "peft_adapter" / "a.json",
               tmp_path / "checkpoints" / "step-0000002" / "state.pt"]
    users = [tmp_path / "notes.txt", tmp_path / "plots" / "loss.png"]
    touch(*outputs, *users)
    with run_folder.lock(str(tmp_path), writer=True):
        run_folder.prepare(str(tmp_path), True, OUTPUTS, writer=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [run_folder.LOCK, "notes.txt", "plots"]
    assert all(p.exists() for p in users)


def test_one_run_per_out_dir_and_a_killed_run_does_not_block_the_next(tmp_path):
    out = tmp_path / "run"
    hold = "import sys, time\nfrom machinery import run_folder\nwith run_folder.lock(sys.argv[1], writer=True):\n" \
           "    print('held', flush=True)\n    time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit, match=rf"--out_dir {out} is in use by another run \(pid {holder.pid} on .*, "
                                             rf"started .*-c .*{out}\): wait for it to end"):
            with run_folder.lock(str(out), writer=True):
                pytest.fail("a second run took the folder")
        with run_folder.lock(str(out), writer=False):  # another process of the same torchrun run takes no lock
            pass
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own runs
        holder.wait(timeout=60)
    assert holder.returncode == -9
    with run_folder.lock(str(out), writer=True):
        assert (out / run_folder.LOCK).read_text().startswith(f"pid {os.getpid()} on ")
