"""Downloads with the standard library (resumable, atomic, checksummed) and resolving a model name to a local folder:
the folder itself, the Hugging Face cache, or a download from the hub.

    folder = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")   # then model.load_model(folder)
    path = cached_download(url, "gsm8k/test.jsonl", sha256)            # CACHE_DIR/gsm8k/test.jsonl, fetched once

Every failure raises DownloadError naming the URL. $HF_TOKEN goes to the hub only, never to a host it redirects to;
every file of one model download comes from one commit, and each is checked against the hash the hub publishes.
"""

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from machinery.files import atomic_write, hash_file, sha256_file
from machinery.safetensors_file import INDEX_FILE, read_weight_map

HUB_ENDPOINT = "https://huggingface.co"  # hub_endpoint() reads $HF_ENDPOINT first
CACHE_DIR = Path.home() / ".cache" / "lorasb"  # downloaded models (models/) and datasets
OPTIONAL_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json")


def hub_endpoint() -> str:
    """The hub's base URL: $HF_ENDPOINT (a mirror, or a test server), else HUB_ENDPOINT."""
    return os.environ.get("HF_ENDPOINT", HUB_ENDPOINT).rstrip("/")


class DownloadError(OSError):
    """A download failed (network, HTTP status, interrupted transfer or checksum). Callers catch it to add a hint."""


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc


class _TokenStaysHome(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, except that the token goes to the first URL's origin (scheme, host, port) only: urllib would
    copy an Authorization header to wherever the server redirects, and the hub redirects large files to a storage host.
    Keeps the headers of each redirect response: the hub puts a file's commit and sha256 there."""

    def __init__(self, origin: tuple[str, str], token: str | None):
        self.origin, self.token, self.responses = origin, token, []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.responses.append(headers)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and self.token and _origin(new.full_url) == self.origin:
            new.add_unredirected_header("Authorization", f"Bearer {self.token}")
        return new


def _open(url: str, token: str | None = None, headers: dict | None = None, method: str = "GET"):
    """urlopen that sends `token` (as a Bearer Authorization) to url's origin only, after redirects too. Returns the
    response and the headers of every response on the way, redirects first."""
    redirects = _TokenStaysHome(_origin(url), token)
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    if token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")  # unredirected: never copied elsewhere
    response = urllib.request.build_opener(redirects).open(request, timeout=60)
    return response, [*redirects.responses, response.headers]


def _hub_checksum(responses: list) -> tuple[str, str] | None:
    """The hash the Hugging Face hub publishes for a file, as (kind, hex): X-Linked-Etag (the sha256 of an LFS file, on
    the redirect to storage), else the ETag of a response that names its commit in X-Repo-Commit (the hub's own: the
    sha256 of an LFS file or the git blob sha1 of a small one). Other servers' ETags are opaque, and ignored."""
    for headers in responses:
        tag = headers.get("X-Linked-Etag") or (headers.get("ETag") if headers.get("X-Repo-Commit") else None)
        tag = (tag or "").removeprefix("W/").strip('"').lower()
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return "sha256", tag
        if re.fullmatch(r"[0-9a-f]{40}", tag):
            return "git blob sha1", tag
    return None


def _checksum(path: Path, kind: str) -> str:
    if kind == "sha256":
        return sha256_file(path)
    return hash_file(path, hashlib.sha1(b"blob %d\0" % path.stat().st_size))  # git's id of a file's contents


class _Interrupted(Exception):
    """The body ended before Content-Length; `received` bytes of this response were written."""

    def __init__(self, received: int):
        super().__init__(f"connection closed early ({received} bytes received)")
        self.received = received


def _fetch(url: str, part: Path, token: str | None, desc: str) -> list:
    """One HTTP request that appends to (206) or rewrites (200) `part`; raises _Interrupted if the body is cut short.
    Returns the headers of the responses (redirects first)."""
    offset = part.stat().st_size if part.exists() else 0
    response, responses = _open(url, token, {"Range": f"bytes={offset}-"} if offset else {})
    with response:
        if response.status == 206:
            if not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                raise DownloadError(f"{url}: the server answered a resume from byte {offset} with "
                                    f"Content-Range {response.headers.get('Content-Range')!r}")
        else:
            offset = 0  # a 200 is the whole file: the server ignored (or does not support) Range, so start over
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = 0
        with open(part, "ab" if offset else "wb") as f, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                                             desc=desc) as bar:
            try:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (http.client.IncompleteRead, ConnectionError, TimeoutError) as e:
                raise _Interrupted(received) from e
            finally:
                f.flush()
                os.fsync(f.fileno())
        # http.client returns b"" instead of raising when the connection closes before Content-Length is met
        if total is not None and offset + received < total:
            raise _Interrupted(received)
    return responses


def download_file(url: str, dest, sha256: str | None = None, token: str | None = None,
                  desc: str | None = None) -> Path:
    """Download `url` to `dest` with the standard library and return `dest`.

    The bytes go to `dest.part`; an interrupted transfer leaves it there and the next attempt resumes it with an HTTP
    Range request (up to 3 attempts per call while each makes progress; a later call resumes too). The finished file
    is checked before the atomic rename against `sha256`, or else against the hash the Hugging Face hub publishes for
    it (_hub_checksum): a file that changed on the server while a resumed download was spliced from two versions fails
    it. A mismatch deletes the .part file. A `dest` that already exists is kept when its hash matches (or when no hash
    is given), else downloaded again. `token` goes to url's own host only, never to a host it redirects to. Every
    failure raises DownloadError naming the URL.
    """
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    for attempt in range(3):
        try:
            responses = _fetch(url, part, token, desc or dest.name)
            break
        except _Interrupted as e:
            if attempt == 2 or e.received == 0:
                raise DownloadError(f"download of {url} was interrupted: {e}; the partial file {part} is kept, "
                                    f"run again to resume") from None
        except urllib.error.HTTPError as e:
            if e.code == 416 and attempt == 0 and part.exists():
                part.unlink()  # the .part is as long as the file or longer (a stale leftover): start over once
                continue
            raise DownloadError(f"could not download {url}: HTTP {e.code} {e.reason}") from e
        except DownloadError:
            raise
        except (urllib.error.URLError, OSError) as e:
            raise DownloadError(f"could not download {url}: {getattr(e, 'reason', e)}") from e
    kind, expected = ("sha256", sha256) if sha256 is not None else _hub_checksum(responses) or (None, None)
    if expected is not None:
        actual = _checksum(part, kind)
        if actual != expected:
            part.unlink()
            raise DownloadError(f"{dest}: {kind} mismatch for {url}: expected {expected}, got {actual}; "
                                f"the partial file was deleted, run again to retry")
    os.replace(part, dest)
    if os.name == "posix":  # make the rename itself durable
        fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return dest


def cached_download(url: str, name: str, sha256: str | None = None, local_option: str = "") -> Path:
    """CACHE_DIR/name, downloaded from `url` the first time (checked against `sha256` when given). When the download
    fails, the error says where to put the file by hand, or which `local_option` (e.g. --data_dir) to pass instead."""
    dest = CACHE_DIR / name
    try:
        return download_file(url, dest, sha256=sha256, desc=name)
    except DownloadError as e:
        instead = f", or pass a local copy with {local_option}" if local_option else ""
        raise DownloadError(f"{e}\nOffline? Put the file {url} at {dest}{instead}.") from e


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / f).is_file() for f in ("model.safetensors", INDEX_FILE))


def hf_cache_snapshot(repo: str) -> Path | None:
    """The snapshot folder of ORG/NAME in the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else
    ~/.cache/huggingface/hub): the one refs/main names, else the newest, provided it has a config and weights."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    root = Path(os.environ.get("HF_HUB_CACHE", home / "hub")).expanduser() / f"models--{repo.replace('/', '--')}"
    snapshots = sorted((root / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = root / "refs" / "main"
    if ref.is_file():
        snapshots.insert(0, root / "snapshots" / ref.read_text().strip())
    return next((s for s in snapshots if _is_model_folder(s)), None)


def download_model(repo: str, cache_dir=None) -> Path:
    """Fetch ORG/NAME from {HF_ENDPOINT}/{repo}/resolve/{commit}/{file} into cache_dir/ORG--NAME (default
    ~/.cache/lorasb/models), with $HF_TOKEN for gated models. Each file is downloaded to a .part file (resumed when
    interrupted), checked against the hash the hub publishes, and renamed when complete; config.json comes last, so its
    presence marks a complete folder. Every file comes from one commit (pinned_revision), even when main moves
    between an interrupted download and its resumption."""
    folder = Path(cache_dir or CACHE_DIR / "models").expanduser() / repo.replace("/", "--")
    if (folder / "config.json").is_file():
        return folder
    endpoint = hub_endpoint()
    token = os.environ.get("HF_TOKEN") or None
    revision = pinned_revision(folder, f"{endpoint}/{repo}", token)

    def fetch(name: str, required: bool = True) -> bool:
        try:
            download_file(f"{endpoint}/{repo}/resolve/{revision}/{name}", folder / name, token=token, desc=name)
            return True
        except DownloadError as e:
            status = getattr(e.__cause__, "code", None)  # the HTTP status; None when the server was not reached
            if status == 404 and not required:
                return False
            hint = ""
            if status in (401, 403):
                hint = "for a gated or private model, accept its license on the hub and set HF_TOKEN; "
            elif status == 404 and revision != "main":
                hint = (f"this download is pinned to commit {revision}, the one it began with (recorded in "
                        f"{folder / '.revision'}); delete {folder} to start over from main; ")
            elif status == 404:
                hint = f"is {repo} a model repository on {endpoint}? "
            raise DownloadError(f"{e}; {hint}to use a model folder you already have, pass it: --model /path/to/folder"
                                ) from e

    for name in OPTIONAL_FILES:
        fetch(name, required=False)
    fetch("tokenizer.json")
    if not fetch("model.safetensors", required=False):
        if not fetch(INDEX_FILE, required=False):
            raise FileNotFoundError(f"{repo} on {endpoint} has neither model.safetensors nor {INDEX_FILE}; only "
                                    f"safetensors checkpoints are supported")
        for shard in sorted(set(read_weight_map(folder / INDEX_FILE).values())):
            fetch(shard)
    fetch("config.json")
    return folder


def pinned_revision(folder: Path, repo_url: str, token: str | None) -> str:
    """The commit this download of a hub repository comes from: the one folder/.revision records (a download began
    earlier), else the commit `main` names now, as the hub reports it in X-Repo-Commit (recorded before any file is
    fetched). A server that reports none (a plain mirror) or cannot be asked gives "main"; the download itself then
    says what went wrong, and each file is still checked against the hash the server publishes."""
    record = folder / ".revision"
    if record.is_file():
        return record.read_text().strip()
    try:
        response, responses = _open(f"{repo_url}/resolve/main/config.json", token, method="HEAD")
        response.close()
    except (urllib.error.URLError, OSError):
        return "main"
    commit = next((h["X-Repo-Commit"] for h in responses if h.get("X-Repo-Commit")), "")
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return "main"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(record, lambda f: f.write(commit.encode()))
    return commit


def resolve_model(name_or_path, cache_dir=None) -> Path:
    """A local model folder for `name_or_path`: an existing folder as it is; else ORG/NAME from the Hugging Face cache
    (hf_cache_snapshot); else downloaded from the hub (download_model, into cache_dir)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name):
        raise FileNotFoundError(f"{name}: no such folder, and not a hub model name of the form ORG/NAME")
    return hf_cache_snapshot(name) or download_model(name, cache_dir)
