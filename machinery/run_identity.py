"""What makes a resumed run the same run: its settings, process count, dtype, training data and model, recorded in
checkpoints/run.json when it starts and compared when it resumes (a changed one is refused, naming it).
"""

import hashlib
import json
from pathlib import Path

import torch

from machinery import run_folder
from machinery.command import refuse
from machinery.files import sha256_file
from machinery.input_files import read_json_object, regular_file

# Settings a resumed run must share with the run it continues (the rest, e.g. --eval_limit, may change).
RESUME_KEYS = ("model", "method", "rank", "lora_alpha", "targets", "train_data", "num_train", "epochs", "max_steps",
               "lr", "warmup_ratio", "weight_decay", "grad_clip", "batch_size", "micro_batch_size", "max_length",
               "seed", "num_init_samples", "init_rule", "init_svd", "init_batch_size", "lr_1", "schedule",
               "commonsense_prompt", "quantize")
# The files of a model folder besides its weights whose content changes what is trained: the architecture, and the
# tokenizer with its special tokens (the EOS that ends every training response, the padding).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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
    recorded = read_json_object(folder / "run.json")
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
