"""Where each dataset's files come from: a local option (--data_dir, --metamathqa_path, --math_path,
--commonsense_dir), or a download into the cache (machinery.hub), checked against a pinned sha256 where one is
published. Each URL can be replaced by an environment variable (a mirror, or a test server)."""

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
# publishes none, so math_task.load_math checks every record instead.
MATH_URL = "https://raw.githubusercontent.com/meta-math/MetaMath/main/data/test/MATH_test.jsonl"
# The commonsense files the authors read: LLM-Adapters' dataset/<task>/test.json and ft-training_set/
# commonsense_170k.json (the union of the eight training sets), at a pinned commit. The test files' sha256 are of that
# commit; HellaSwag's test file and the 170K training file are too large for the copy they were taken from, so no
# checksum is pinned for them and commonsense.load_commonsense checks every record instead.
COMMONSENSE_URL = ("https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/"
                   "816657208af4db747803f87ba40a4c71383fed7a")
COMMONSENSE_TRAIN = "ft-training_set/commonsense_170k.json"
COMMONSENSE_TEST_SHA256 = {
    "boolq": "89df2397cbca81dc31adcc6f7f5b635821aa0565aafde46725b2b4bd39b4dfa9",  # 3270 questions
    "piqa": "3860d11b9b42e590b6b4bbc1643214d373ed0b0d4ac62fcc7bdceb8e044ad141",  # 1838
    "social_i_qa": "71543f41127451945379d106ffedaef502f1c8770dff6d2f543aca85e3080b1d",  # 1954
    "winogrande": "6946f5209e7114c65c6d04f8f644c5a061af20d730b1cfe158fff3dc44076fb9",  # 1267
    "ARC-Easy": "3f32a84716ca6d57d38728bf80cc8117aecd17445c2cf29a68b571b810eb82dc",  # 2376
    "ARC-Challenge": "4a89ce368ae01a71d268d9851686738b2a0a1d84271116bab49a1dd2b48ecad7",  # 1172
    "openbookqa": "8479930f7b8a26052c78250280b5465a4016ca7fc806af440d0f37e243f3099e",  # 500
}


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


def commonsense_base_url() -> str:
    """LLM-Adapters' files at the pinned commit; LORASB_COMMONSENSE_URL replaces the base URL."""
    return os.environ.get("LORASB_COMMONSENSE_URL", COMMONSENSE_URL).rstrip("/")


def commonsense_train_files(folder: str | None) -> list[Path]:
    """The commonsense training files: in --commonsense_dir (the authors' layout) its commonsense_170k.json when
    present, else every <task>/train.json it holds (in path order); without a folder, commonsense_170k.json (the
    paper's 170K examples) downloaded into the cache once."""
    if folder:
        union = Path(folder) / Path(COMMONSENSE_TRAIN).name
        # exists, not is_file: a FIFO in its place is taken, and its loader refuses it, naming it
        return [union] if union.exists() else sorted(Path(folder).glob("*/train.json"))
    return [hub.cached_download(f"{commonsense_base_url()}/{COMMONSENSE_TRAIN}", "commonsense/commonsense_170k.json",
                                local_option="--commonsense_dir")]


def commonsense_test_file(task: str, folder: str | None) -> Path:
    """A task's test.json: <task>/test.json in --commonsense_dir when there, else LLM-Adapters' downloaded into the
    cache once (sha256-checked where pinned)."""
    local = Path(folder or "") / task / "test.json"
    if folder and local.exists():  # a FIFO or a folder too: its loader refuses it, naming it
        return local
    return hub.cached_download(f"{commonsense_base_url()}/dataset/{task}/test.json", f"commonsense/{task}/test.json",
                               COMMONSENSE_TEST_SHA256.get(task), "--commonsense_dir")
