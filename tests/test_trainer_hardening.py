"""The trainer under a hostile or careless user, end to end on the tiny model (issue 27): files in its own folder that
are no regular files, sizes the model or the memory cannot hold, signals outside the training loop, a full disk
before the first step, and what a short run shows its user."""

import errno
import os
import shutil

import pytest

import lorasb
import train_gsm8k
from conftest import deadline
from machinery import checkpoints


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
    real_write_run_record = checkpoints.write_run_record

    def no_space(fd, mode):
        os.close(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    def write_on_a_full_disk(*args):
        monkeypatch.setattr(lorasb.os, "fdopen", no_space)
        real_write_run_record(*args)

    monkeypatch.setattr(checkpoints, "write_run_record", write_on_a_full_disk)
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
