"""machinery/run_folder.py: strict JSON, and the cleanup of what interrupted writes leave (the trainer's end-to-end
tests in test_train.py cover the rest)."""

import lorasb
from machinery import run_folder


def test_json_outputs_are_strict():
    assert run_folder.strict_json({"loss": float("nan"), "rows": [float("inf"), 1.5]}) == \
        '{"loss": null, "rows": [null, 1.5]}'


def test_remove_interrupted_writes_takes_temporary_files_and_checkpoint_folders_only(tmp_path):
    lorasb.atomic_write(tmp_path / "kept.json", lambda f: f.write(b"{}"))
    temporary = [tmp_path / ".summary.json.a1b2c3d4.tmp", tmp_path / "sub" / ".run.json.zz_9x8w7.tmp"]
    kept = [tmp_path / "kept.json", tmp_path / ".notes.tmp", tmp_path / "sub" / "x.a1b2c3d4.tmp"]
    for path in temporary + kept[1:] + [tmp_path / "checkpoints" / ".tmp-step-0000004" / "state.pt"]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    removed = run_folder.remove_interrupted_writes(tmp_path)
    assert sorted(removed) == sorted(map(str, [tmp_path / "checkpoints" / ".tmp-step-0000004", *temporary]))
    assert all(p.exists() for p in kept) and (tmp_path / "checkpoints").is_dir()
