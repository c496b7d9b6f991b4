"""machinery/run_folder.py: strict JSON, the lock that keeps one run per --out_dir, and what --overwrite and the
cleanup of interrupted writes remove (the trainer's end-to-end tests in test_train.py cover the rest)."""

import argparse
import os
import re
import subprocess
import sys

import pytest

import lorasb
from conftest import REPO, deadline
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


def options(out, **given) -> argparse.Namespace:
    """The arguments run_folder.check reads: --out_dir, the switches and the inputs (none unless given)."""
    return argparse.Namespace(**{"out_dir": str(out), "resume": False, "overwrite": False, "eval_only": False,
                                 **dict.fromkeys(run_folder.INPUTS), **given})


def test_an_out_dir_that_is_or_holds_an_input_is_refused_naming_both(tmp_path):
    run, model = tmp_path / "run", tmp_path / "model"
    touch(run / "adapter.safetensors", run / "model" / "config.json", model / "config.json", run / "data" / "x")
    for out, name, value in [(run, "adapter", run / "adapter.safetensors"), (run, "model", run / "model"),
                             (model, "model", model), (run, "data_dir", run / "data")]:
        for switch in ({"overwrite": True}, {"resume": True}, {}):
            problems = run_folder.check(options(out, **switch, **{name: str(value)}))
            assert f"--out_dir {out} {'is' if out == value else 'holds'} --{name} {value}, which this run reads: " \
                   f"the run writes its outputs there, and --overwrite deletes them; choose an --out_dir outside it" \
                   in problems
    (tmp_path / "link").symlink_to(run)  # the same folder under another name
    assert any("holds --adapter" in p for p in run_folder.check(options(tmp_path / "link", overwrite=True,
                                                                       adapter=str(run / "adapter.safetensors"))))
    assert run_folder.check(options(model / "runs" / "x", model=str(model))) == []  # beside the inputs: allowed
    assert run_folder.check(options(tmp_path / "new", model="Org/not-a-local-folder")) == []  # a hub name


def test_the_lock_follows_no_symlink_and_refuses_what_is_not_its_file(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("precious")
    for kind, make in [("a symbolic link", lambda p: p.symlink_to(mine)), ("a folder", lambda p: p.mkdir()),
                       ("a FIFO", os.mkfifo)]:
        name = kind.split()[-1]
        (tmp_path / name).mkdir()
        make(tmp_path / name / run_folder.LOCK)
        with deadline(30), pytest.raises(SystemExit, match=rf"{tmp_path / name / run_folder.LOCK} is {kind}.*"
                                                          rf"remove it \(the run makes its own\)"):
            with run_folder.lock(str(tmp_path / name), writer=True):
                pytest.fail("the lock was taken")
    assert mine.read_text() == "precious"


def test_append_jsonl_writes_through_no_symlink(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("precious")
    (tmp_path / "metrics.jsonl").symlink_to(mine)
    with pytest.raises(OSError):
        run_folder.append_jsonl(tmp_path / "metrics.jsonl", {"step": 1})
    assert mine.read_text() == "precious"


def test_resume_refuses_a_fifo_as_metrics_instead_of_waiting_for_a_writer(tmp_path):
    touch(tmp_path / "checkpoints" / "step-0000002" / "state.pt")
    os.mkfifo(tmp_path / "metrics.jsonl")
    expected = f"{tmp_path / 'metrics.jsonl'} is not a regular file (a FIFO, a folder, a device or a broken symlink)"
    with deadline(30):
        assert any(p.startswith(expected) for p in run_folder.check(options(tmp_path, resume=True)))
        with pytest.raises(ValueError, match=re.escape(expected)):
            run_folder.cut_metrics(tmp_path / "metrics.jsonl", 2)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").symlink_to(tmp_path / "metrics.jsonl")  # a loop: ELOOP, not a raw OSError
    assert any(p.startswith(expected) for p in run_folder.check(options(tmp_path, resume=True)))


def test_an_out_dir_through_a_broken_symlink_or_in_bytes_not_utf8_is_refused_naming_it(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out, link in [("loop", "loop"), ("loop/run", "loop"), ("dangling", "dangling")]:
        assert run_folder.check(options(tmp_path / out)) == [
            f"--out_dir {tmp_path / out}: {tmp_path / link} is a symbolic link to {os.readlink(tmp_path / link)}, "
            f"which does not exist or leads back to itself; remove the link, or make it point to a folder"]
    out = os.fsdecode(os.fsencode(tmp_path) + b"/runs/\xff")
    problems = run_folder.check(options(out, data_dir=os.fsdecode(b"data-\xfe")))
    assert problems == [f"--out_dir {os.fsencode(out)!r}: the path holds bytes that are not UTF-8 (shown as \\x..), "
                        f"which the run cannot print or record; rename it in UTF-8",
                        "--data_dir b'data-\\xfe': the path holds bytes that are not UTF-8 (shown as \\x..), which "
                        "the run cannot print or record; rename it in UTF-8"]


def test_a_run_that_wrote_nothing_leaves_no_folder_and_one_that_wrote_keeps_its_lock(tmp_path):
    with pytest.raises(SystemExit):
        with run_folder.lock(str(tmp_path / "runs" / "new"), writer=True):
            assert (tmp_path / "runs" / "new" / run_folder.LOCK).is_file()
            sys.exit("refused: a missing input")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()  # the user's folder stays, without the lock
    with run_folder.lock(str(tmp_path / "empty"), writer=True):
        pass
    assert list((tmp_path / "empty").iterdir()) == []
    with run_folder.lock(str(tmp_path / "wrote"), writer=True):
        touch(tmp_path / "wrote" / "config.json")
    assert sorted(p.name for p in (tmp_path / "wrote").iterdir()) == [run_folder.LOCK, "config.json"]


def test_eval_only_in_a_training_run_s_folder_names_the_options_that_work(tmp_path):
    touch(tmp_path / "adapter.safetensors", tmp_path / "checkpoints" / "step-0000002" / "state.pt")
    assert run_folder.check(options(tmp_path, eval_only=True)) == [
        f"--out_dir {tmp_path} exists and is not empty: choose another --out_dir for --eval_only (to evaluate its "
        f"adapter: --adapter {tmp_path / 'adapter.safetensors'} --out_dir {tmp_path}-eval), or pass --overwrite to "
        f"delete the outputs there (a training run's checkpoints and adapter among them)"]
    assert "--resume" not in run_folder.check(options(tmp_path, eval_only=True))[0]
