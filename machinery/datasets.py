"""Where each dataset's files come from: a local option (--data_dir, --metamathqa_path, --math_path), or a download
into the cache (machinery.hub), checked against a pinned sha256 where one is published. Each URL can be replaced by an
environment variable (a mirror, or a test server)."""

import os
from pathlib import Path

from machinery import hub

GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"
GSM8K_SHA256 = {
    "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",  # 7473 problems
    "test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",  # 1319 problems
}
METAMATHQA_FILE = "datasets/meta-math/MetaMathQA/resolve/main/MetaMathQA-395K.json"  # on the Hugging Face hub
# MetaMath's MATH test file (5000 problems), which the authors' MATH_eval.py reads. No checksum is pinned: MetaMath
# publishes none, so data.load_math checks every record instead.
MATH_URL = "https://raw.githubusercontent.com/meta-math/MetaMath/main/data/test/MATH_test.jsonl"


def gsm8k_dir(data_dir: str | None) -> Path:
    """GSM8K's folder: --data_dir, or the cache, into which the official files are downloaded (sha256-checked) once.
    LORASB_GSM8K_URL replaces their base URL."""
    if data_dir:
        return Path(data_dir)
    base = os.environ.get("LORASB_GSM8K_URL", GSM8K_URL).rstrip("/")
    for split, sha256 in GSM8K_SHA256.items():
        hub.cached_download(f"{base}/{split}.jsonl", f"gsm8k/{split}.jsonl", sha256, "--data_dir")
    return hub.CACHE_DIR / "gsm8k"


def metamathqa_file(path: str | None) -> Path:
    """--metamathqa_path, or MetaMathQA-395K.json (~400 MB) from the hub (HF_ENDPOINT or huggingface.co), downloaded
    into the cache once. No checksum is published for it, so it is not verified."""
    if path:
        return Path(path)
    return hub.cached_download(f"{hub.hub_endpoint()}/{METAMATHQA_FILE}", "metamathqa/MetaMathQA-395K.json",
                               local_option="--metamathqa_path")


def math_file(path: str | None) -> Path:
    """--math_path, or MetaMath's MATH_test.jsonl (~6 MB) downloaded into the cache once. LORASB_MATH_URL replaces its
    URL."""
    if path:
        return Path(path)
    return hub.cached_download(os.environ.get("LORASB_MATH_URL", MATH_URL), "math/MATH_test.jsonl",
                               local_option="--math_path")
