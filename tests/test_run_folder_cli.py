"""The trainer's --out_dir end to end (train_gsm8k.main on the tiny model): inputs inside it are refused before
anything is removed, a FIFO in it is refused instead of waited on, and a run refused before it began leaves no
folder."""

import functools
import os
import shutil
import socket

import pytest

import train_gsm8k
from conftest import deadline
from machinery import command, hub


def trainer_argv(out, model_dir, data_dir, *extra) -> list[str]:
    """A 4-step LoRA-SB run of rank 4 on the tiny model, checkpointed every 2 steps, evaluated on 2 questions."""
    return ["--model", str(model_dir), "--data_dir", str(data_dir), "--out_dir", str(out), "--device", "cpu",
            "--batch_size", "4", "--micro_batch_size", "2", "--max_steps", "4", "--rank", "4", "--lr", "1e-2",
            "--num_init_samples", "4", "--eval_limit", "2", "--max_new_tokens", "4", "--save_every", "2", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_gsm8k_dir):
    """A finished 4-step LoRA-SB run, with its adapter, checkpoints and predictions; tests copy it before use."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_gsm8k.main(trainer_argv(out, tiny_model_dir, tiny_gsm8k_dir))
    return out


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_refuses_an_out_dir_that_holds_the_adapter_or_model_it_reads(trained, tmp_path, tiny_model_dir,
                                                                                tiny_gsm8k_dir):
    out = shutil.copytree(trained, tmp_path / "run")
    before = listing(out)
    adapter = out / "adapter.safetensors"
    with pytest.raises(SystemExit, match=f"--out_dir {out} holds --adapter {adapter}, which this run reads"):
        train_gsm8k.main(trainer_argv(out, tiny_model_dir, tiny_gsm8k_dir, "--eval_only", "--adapter", str(adapter),
                                      "--overwrite"))
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    with pytest.raises(SystemExit, match=f"--out_dir {model} is --model {model}, which this run reads"):
        train_gsm8k.main(trainer_argv(model, model, tiny_gsm8k_dir, "--overwrite"))
    assert listing(out) == before and (model / "config.json").is_file()


def test_resume_refuses_a_fifo_as_metrics_before_loading(trained, tmp_path, tiny_model_dir, tiny_gsm8k_dir):
    out = shutil.copytree(trained, tmp_path / "run")
    (out / "metrics.jsonl").unlink()
    os.mkfifo(out / "metrics.jsonl")
    with deadline(60), pytest.raises(SystemExit, match=f"{out / 'metrics.jsonl'} is not a regular file"):
        train_gsm8k.main(trainer_argv(out, tiny_model_dir, tiny_gsm8k_dir, "--resume"))


def test_a_run_refused_before_it_began_leaves_no_folder(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("LORASB_GSM8K_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens: offline
    monkeypatch.setattr(hub, "CACHE_DIR", tmp_path / "cache")
    out = tmp_path / "runs" / "offline"
    for model in (tiny_model_dir, tmp_path / "no-model"):  # the data cannot be downloaded; the model is missing
        with pytest.raises(SystemExit, match="Cannot start:\n  - "):  # every missing input at once
            command.run(functools.partial(train_gsm8k.main, ["--model", str(model), "--out_dir", str(out),
                                                             "--device", "cpu"]))
        assert not (tmp_path / "runs").exists()
