"""The trainer under a hostile or careless user, end to end on the tiny model (issue 27): files in its own folder that
are no regular files, sizes the model or the memory cannot hold, signals outside the training loop, a full disk
before the first step, and what a short run shows its user."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import warnings

import pytest

import train_gsm8k
from conftest import REPO, deadline, full_disk_during
from machinery import checkpoints, hub


def b_argv(out, model_dir, data_dir, *extra) -> list[str]:
    """B: a 6-step LoRA-SB run of rank 4 on the tiny model, checkpointed every 2 steps, evaluated on 2 questions."""
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--out_dir", str(out), "--device", "cpu",
            "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "6", "--rank", "4", "--lr", "1e-2",
            "--num_init_samples", "4", "--eval_limit", "2", "--max_new_tokens", "4", "--save_every", "2", *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tiny_gsm8k_dir):
    """A finished run of B (checkpoints of steps 4 and 6). Tests copy it before touching it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train_gsm8k.main(b_argv(out, tiny_model_dir, tiny_gsm8k_dir))
    return out


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_resume_skips_a_checkpoint_whose_manifest_is_a_fifo_without_waiting(finished_run, tmp_path, tiny_model_dir,
                                                                           tiny_gsm8k_dir, capsys):
    out = shutil.copytree(finished_run, tmp_path / "run")
    manifest = out / "checkpoints" / "step-0000006" / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    with deadline(60):  # TimeoutError is an OSError: a read that blocks ends as a "damaged" manifest, not this one
        train_gsm8k.main(b_argv(out, tiny_model_dir, tiny_gsm8k_dir, "--resume"))
    printed = capsys.readouterr().out
    assert f"skipping damaged checkpoints (step-0000006: no readable manifest.json (ValueError: {manifest} is a FIFO" \
           in printed
    assert f"resumed from {out / 'checkpoints' / 'step-0000004'} at step 4" in printed


def test_a_full_disk_before_the_first_step_says_so_in_one_message(tmp_path, tiny_model_dir, tiny_gsm8k_dir,
                                                                  monkeypatch):
    full_disk_during(monkeypatch, checkpoints, "write_run_record")
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"^Stopped: the run record \(checkpoints/run.json and the adapter as "
                                         r"initialized\), before the first step, could not be written to .*: the disk "
                                         r"is full \(.* MiB free there\)\. Make room, then run again with --overwrite"):
        train_gsm8k.main(b_argv(out, tiny_model_dir, tiny_gsm8k_dir))
    monkeypatch.undo()
    train_gsm8k.main(b_argv(out, tiny_model_dir, tiny_gsm8k_dir, "--overwrite"))
    assert (out / "summary.json").is_file()


def never_loaded(*args, **kwargs):
    raise AssertionError("the model was loaded before the problem was found")


@pytest.mark.parametrize("option, value, title, prompt", [("max_new_tokens", 10**9, "GSM8K", 195),
                                                          ("max_new_tokens", 2**63, "GSM8K", 195),
                                                          ("math_max_new_tokens", 10**9, "MATH", 180)])
def test_a_generation_budget_past_the_model_s_context_is_refused_before_training(tmp_path, tiny_model_dir,
                                                                                 tiny_gsm8k_dir, tiny_math_file,
                                                                                 monkeypatch, option, value, title,
                                                                                 prompt):
    """Before: --max_new_tokens 1000000000 trained, saved, then failed at evaluation with a raw RuntimeError (a 256 GB
    KV cache); 2**63, a raw TypeError in model.py."""
    monkeypatch.setattr(train_gsm8k.model_lib, "load_model", never_loaded)
    argv = b_argv(tmp_path / "run", tiny_model_dir, tiny_gsm8k_dir, "--eval_data", "gsm8k,math", "--math_path",
                  str(tiny_math_file), f"--{option}", str(value), "--max_length", "2000")
    with pytest.raises(SystemExit) as refused:
        train_gsm8k.main(argv)
    message = str(refused.value)
    assert f"--{option} {value}: {title}'s longest prompt ({prompt} tokens) and {value} new tokens exceed the 1024 " \
           f"tokens the model takes (its config.json's max_position_embeddings): pass --{option} {1024 - prompt} " \
           f"or less" in message
    assert "--max_length 2000 exceeds the 1024 tokens the model takes" in message
    assert not (tmp_path / "run").exists()


def test_a_kv_cache_larger_than_the_memory_is_refused_before_training(tmp_path, tiny_model_dir, tiny_gsm8k_dir,
                                                                      monkeypatch):
    monkeypatch.setattr(train_gsm8k.model_lib, "load_model", never_loaded)
    monkeypatch.setattr(train_gsm8k.arguments, "memory_bytes", lambda device: 2**20)  # a device of 1 MiB
    argv = b_argv(tmp_path / "run", tiny_model_dir, tiny_gsm8k_dir, "--eval_limit", "6", "--max_new_tokens", "800")
    # 6 prompts (of 6 questions) of up to 195 + 800 tokens x 2 layers x 2 (k, v) x 2 KV heads x 8 dims x 4 bytes
    with pytest.raises(SystemExit, match=r"--eval_batch_size 64 with --max_new_tokens 800: generation's KV cache "
                                         r"\(6 prompts of up to 995 tokens\) takes 1\.5 MiB, more than the 1\.0 MiB "
                                         r"of cpu"):
        train_gsm8k.main(argv)


def signalled_trainer(out, model_dir, data_dir, target: str, signum: int, *extra) -> subprocess.CompletedProcess:
    """The trainer (B) in a process of its own that sends itself `signum` as it calls `target` (a function of
    train_gsm8k, or of a module it imports, e.g. "model_lib.load_model") for the first time; 120 s at most."""
    *owner, name = target.split(".")
    code = "\n".join(["import os, sys", "import train_gsm8k", "owner = train_gsm8k",
                      *[f"owner = owner.{part}" for part in owner], f"real = owner.{name}", "sent = []",
                      "def hooked(*args, **kwargs):", "    if not sent:", f"        os.kill(os.getpid(), {signum})",
                      "        sent.append(1)", "    return real(*args, **kwargs)", f"owner.{name} = hooked",
                      "train_gsm8k.main(sys.argv[1:])"])
    return subprocess.run([sys.executable, "-c", code, *b_argv(out, model_dir, data_dir, *extra)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def printed_command(stderr: str, after: str) -> list[str]:
    """The arguments of the command a stopped run printed on the line after `after`."""
    command = shlex.split(stderr.split(after, 1)[1].splitlines()[1])
    assert command[:2] == ["python", "train_gsm8k.py"], command
    return command[2:]


# Each case is a trainer process of its own (~5 s): one per phase and signal the others leave untested, so that the
# default suite stays under 3 minutes (SIGINT is tested at the final save, SIGTERM at the model load and evaluation).
@pytest.mark.parametrize("target, name", [("model_lib.load_model", "SIGTERM"),
                                          ("estimate_update_from_examples", "SIGHUP")])
def test_a_signal_before_training_stops_with_one_message_and_the_command_that_starts_again(
        tmp_path, tiny_model_dir, tiny_gsm8k_dir, target, name):
    """Before: SIGTERM ended the run at once with no message (rc -15), SIGINT with a KeyboardInterrupt traceback,
    SIGHUP with no message (rc -1)."""
    out, signum = tmp_path / "run", signal.Signals[name]
    stopped = signalled_trainer(out, tiny_model_dir, tiny_gsm8k_dir, target, signum)
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    said = f"Stopped by {name} before training began: nothing of this run is kept. To start it again:"
    assert said in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert not out.exists()  # the run had written nothing: no folder is left behind
    argv = printed_command(stopped.stderr, said)
    assert argv == b_argv(out, tiny_model_dir, tiny_gsm8k_dir)
    train_gsm8k.main(argv)
    assert (out / "summary.json").is_file()


@pytest.mark.parametrize("target, name", [("generate_answers", "SIGHUP"), ("save_outputs", "SIGINT")])
def test_a_signal_after_training_stops_with_one_message_and_resume_writes_the_outputs(
        finished_run, tmp_path, tiny_model_dir, tiny_gsm8k_dir, target, name):
    out, signum = tmp_path / "run", signal.Signals[name]
    stopped = signalled_trainer(out, tiny_model_dir, tiny_gsm8k_dir, target, signum)
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    said = f"Stopped by {name} after training, before its outputs were all written: the checkpoint of its last " \
           f"step is in {out / 'checkpoints'}. To write them (the run resumes at its end):"
    assert said in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step-0000006" and not (out / "summary.json").exists()
    argv = printed_command(stopped.stderr, said)
    assert argv == b_argv(out, tiny_model_dir, tiny_gsm8k_dir, "--resume")
    train_gsm8k.main(argv)
    assert (out / "adapter.safetensors").read_bytes() == (finished_run / "adapter.safetensors").read_bytes()
    assert (out / "predictions.jsonl").read_text() == (finished_run / "predictions.jsonl").read_text()


def test_a_signal_during_an_evaluation_says_so_and_how_to_run_it_again(tmp_path, tiny_model_dir, tiny_gsm8k_dir):
    out = tmp_path / "eval"
    stopped = signalled_trainer(out, tiny_model_dir, tiny_gsm8k_dir, "generate_answers", signal.SIGTERM, "--eval_only")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    said = "Stopped by SIGTERM before the evaluation ended: nothing of it is kept. To run it again:"
    assert said in stopped.stderr and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert printed_command(stopped.stderr, said) == b_argv(out, tiny_model_dir, tiny_gsm8k_dir, "--eval_only")


def test_sighup_in_training_stops_at_the_step_boundary_with_a_checkpoint(tmp_path, tiny_model_dir, tiny_gsm8k_dir,
                                                                         capsys):
    """Before: SIGHUP (a closed terminal or ssh session) killed the run mid-step (rc -1), its steps since the last
    checkpoint lost. The bar shows the step the message names."""
    out = tmp_path / "run"
    stopped = signalled_trainer(out, tiny_model_dir, tiny_gsm8k_dir, "train_step", signal.SIGHUP, "--max_steps", "8",
                                "--save_every", "100")
    assert stopped.returncode == 129, stopped.stderr[-3000:]
    said = f"Stopped at step 1 by SIGHUP: its checkpoint is in {out / 'checkpoints'}. To continue the run:"
    assert said in stopped.stderr, stopped.stderr[-3000:]
    bars = re.findall(r"training:.*?\| (\d+)/8 ", stopped.stderr.split(said)[0])
    assert bars[-1] == "1"
    summary = train_gsm8k.main(printed_command(stopped.stderr, said))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 9))  # every step: the default log_every of a short run
    # the summary times the whole run, and the part since it resumed (before: only that part)
    assert summary["resumed_at_step"] == 1 and 0 < summary["resumed_train_seconds"] < summary["train_seconds"]
    assert rows[0]["elapsed_s"] < rows[1]["elapsed_s"]  # the whole run's time, not the resumed part's
    printed = capsys.readouterr().out
    assert re.search(r"\| training \d+\.\d s \(\d+\.\d s since it resumed at step 1\) \|", printed)


@pytest.mark.parametrize("steps, log_every", [(6, 1), (39, 1), (100, 5), (200, 10), (5000, 10)])
def test_a_short_run_logs_every_step_and_a_long_one_every_tenth(steps, log_every):
    """The default --log_every is a twentieth of the steps, 1 to 10 (before: 10, so that the README's 20-step CPU
    run logged two points)."""
    args = train_gsm8k.parse_args(["--method", "lora", "--batch_size", "4", "--micro_batch_size", "4", "--max_steps",
                                   str(steps)])
    assert train_gsm8k.plan_training(args, 4 * steps, 1).log_every == log_every
    args = train_gsm8k.parse_args(["--method", "lora", "--batch_size", "4", "--micro_batch_size", "4", "--max_steps",
                                   str(steps), "--log_every", "3"])
    assert train_gsm8k.plan_training(args, 4 * steps, 1).log_every == 3


def test_the_run_s_warnings_are_log_lines_said_once_in_plain_words(tmp_path, tiny_model_dir, tiny_gsm8k_dir, capsys,
                                                                     monkeypatch):
    """Before: two raw UserWarnings with their source lines, one in data.py's words ("2 of 7473 prompts tokenize
    differently alone than inside prompt + response"), in every run (the tiny tokenizer merges too little to show
    it: data.py's warning is raised here as data.py words it)."""
    real_tokenize = train_gsm8k.data.tokenize_dataset

    def tokenize_dataset(tokenizer, pairs, max_length):
        warnings.warn(f"2 of {len(pairs)} prompts tokenize differently alone than inside prompt + response: their "
                      f"first response token is masked or their last prompt token is trained (the authors' rule, kept)")
        return real_tokenize(tokenizer, pairs, max_length)

    monkeypatch.setattr(train_gsm8k.data, "tokenize_dataset", tokenize_dataset)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning leaves the run as a UserWarning
        train_gsm8k.main(b_argv(tmp_path / "run", tiny_model_dir, tiny_gsm8k_dir))
    printed = capsys.readouterr()
    said = [line for line in printed.out.splitlines() if line.startswith("warning: ")]
    assert len(said) == 2, said
    assert said[0].startswith("warning: in 2 of 48 training examples the tokenizer joins the last character of the "
                              "prompt and the first of the answer into one token")
    assert said[1].startswith("warning: lr_1 = 0.01 is the peak learning rate: a schedule of 6 steps has 1 warmup")
    assert "UserWarning" not in printed.err and "tokenize differently" not in printed.out + printed.err


def test_offline_every_missing_input_is_reported_in_one_run(tmp_path, monkeypatch):
    """Before: the missing model was reported, then (once given) the missing data, one run at a time."""
    monkeypatch.setenv("LORASB_GSM8K_URL", "http://127.0.0.1:9")  # the discard port: nobody answers, offline
    monkeypatch.setattr(hub, "CACHE_DIR", tmp_path / "cache")
    out = tmp_path / "run"
    with deadline(120), pytest.raises(SystemExit) as refused:
        train_gsm8k.main(["--model", str(tmp_path / "no_model"), "--out_dir", str(out), "--device", "cpu"])
    lines = str(refused.value).splitlines()
    assert lines[0] == "Cannot start:"
    assert lines[-1] == "  - check the connection, or pass local files as each line says"
    assert lines[1] == f"  - {tmp_path / 'no_model'}: no such folder, and not a hub model name of the form ORG/NAME"
    assert lines[2].startswith("  - could not download http://127.0.0.1:9/") and "--data_dir" in lines[3]
    assert not out.exists()
