"""machinery/hub.py against loopback servers: downloads (resume, checksums, errors), the dataset files that
machinery/datasets.py fetches into the cache, and resolve_model (local folder, Hugging Face cache, the hub)."""

import functools
import hashlib
import json
import random
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import data
import model as model_lib
from machinery import commonsense, datasets, math_task, safetensors_file
from lorasb import load_safetensors
from machinery import hub as hub_lib
from test_model import write_shards


# -----------------------------------------------------------------------------
# a loopback HTTP server for the download tests


@pytest.fixture
def serve():
    """serve(files, ignore_range=False, cut=0) -> (base_url, log, state): serves files (path -> bytes) on 127.0.0.1
    with Range support. ignore_range answers every request with 200 and the whole file; the first state["cut"]
    responses send only half their body and close. log lists (path, Range header) per request."""
    servers = []

    def start(files, ignore_range=False, cut=0):
        log, state = [], {"cut": cut}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                log.append((self.path, self.headers.get("Range")))
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                send_body(self, body, ignore_range, state)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", log, state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def send_body(handler: BaseHTTPRequestHandler, body: bytes, ignore_range: bool, state: dict,
              headers: dict | None = None) -> None:
    """Answer a GET with `body`: from the Range header's start (206), or whole (200) when there is none or
    ignore_range; 416 past the end. While state["cut"] > 0, a response sends only half its payload (and decrements)."""
    start_byte, range_header = 0, handler.headers.get("Range")
    if range_header and not ignore_range:
        start_byte = int(range_header.removeprefix("bytes=").rstrip("-"))
        if start_byte >= len(body):
            handler.send_response(416)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {start_byte}-{len(body) - 1}/{len(body)}")
    else:
        handler.send_response(200)
    payload = body[start_byte:]
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    if state["cut"] > 0:
        state["cut"] -= 1
        payload = payload[:len(payload) // 2]
    handler.wfile.write(payload)


def closed_port_url() -> str:
    """A loopback URL on which nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


BLOB = random.Random(0).randbytes(300_000)


# -----------------------------------------------------------------------------
# downloads


def test_download_verifies_and_skips_a_present_file(serve, tmp_path):
    url, log, _ = serve({"/f.bin": BLOB})
    dest = tmp_path / "sub" / "f.bin"
    assert hub_lib.download_file(url + "/f.bin", dest, sha256=sha(BLOB)) == dest
    assert dest.read_bytes() == BLOB and not (tmp_path / "sub" / "f.bin.part").exists()
    hub_lib.download_file(url + "/f.bin", dest, sha256=sha(BLOB))
    assert len(log) == 1  # present with the right hash: no second request


def test_download_checksum_mismatch_leaves_no_file(serve, tmp_path):
    url, _, _ = serve({"/f.bin": BLOB})
    dest = tmp_path / "f.bin"
    with pytest.raises(hub_lib.DownloadError) as e:
        hub_lib.download_file(url + "/f.bin", dest, sha256="0" * 64)
    assert str(dest) in str(e.value) and "0" * 64 in str(e.value) and sha(BLOB) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_resumes_a_cut_transfer_with_range(serve, tmp_path):
    url, log, _ = serve({"/f.bin": BLOB}, cut=1)
    dest = hub_lib.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert dest.read_bytes() == BLOB
    assert log == [("/f.bin", None), ("/f.bin", f"bytes={len(BLOB) // 2}-")]


def test_download_resumes_a_partial_file_from_an_earlier_run(serve, tmp_path):
    url, log, _ = serve({"/f.bin": BLOB})
    (tmp_path / "f.bin.part").write_bytes(BLOB[:1000])
    hub_lib.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert (tmp_path / "f.bin").read_bytes() == BLOB and log == [("/f.bin", "bytes=1000-")]


def test_download_restarts_when_the_server_ignores_range(serve, tmp_path):
    url, log, _ = serve({"/f.bin": BLOB}, ignore_range=True)
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    hub_lib.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert (tmp_path / "f.bin").read_bytes() == BLOB and log == [("/f.bin", "bytes=1000-")]


def test_download_restarts_after_416_on_a_too_long_partial_file(serve, tmp_path):
    url, log, _ = serve({"/f.bin": BLOB})
    (tmp_path / "f.bin.part").write_bytes(BLOB + b"extra")
    hub_lib.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert (tmp_path / "f.bin").read_bytes() == BLOB and log[-1] == ("/f.bin", None)


def test_download_keeps_the_partial_file_when_cut_repeatedly_and_resumes_later(serve, tmp_path):
    url, log, state = serve({"/f.bin": BLOB}, cut=10)
    with pytest.raises(hub_lib.DownloadError, match="interrupted.*run again to resume"):
        hub_lib.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    part = tmp_path / "f.bin.part"
    kept = part.stat().st_size
    assert len(log) == 3 and 0 < kept < len(BLOB) and not (tmp_path / "f.bin").exists()
    state["cut"] = 0
    hub_lib.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert (tmp_path / "f.bin").read_bytes() == BLOB and log[-1] == ("/f.bin", f"bytes={kept}-")


def test_download_errors_name_the_url(serve, tmp_path):
    offline = closed_port_url() + "/f.bin"
    with pytest.raises(hub_lib.DownloadError, match=offline):
        hub_lib.download_file(offline, tmp_path / "f.bin")
    url, _, _ = serve({})
    with pytest.raises(hub_lib.DownloadError, match="HTTP 404") as e:
        hub_lib.download_file(url + "/missing.bin", tmp_path / "f.bin")
    assert e.value.__cause__.code == 404  # download_model reads the HTTP status from the cause
    assert issubclass(hub_lib.DownloadError, OSError)


def test_gsm8k_is_downloaded_into_the_cache_once(serve, tmp_path, monkeypatch):
    rows = [{"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}]
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    url, log, _ = serve({"/gsm/test.jsonl": payload})
    monkeypatch.setenv("LORASB_GSM8K_URL", url + "/gsm")
    monkeypatch.setattr(datasets, "GSM8K_SHA256", {"test": sha(payload)})
    monkeypatch.setattr(hub_lib, "CACHE_DIR", tmp_path)
    assert data.load_gsm8k("test", datasets.gsm8k_dir(None)) == rows
    assert data.load_gsm8k("test", datasets.gsm8k_dir(None)) == rows
    assert len(log) == 1 and (tmp_path / "gsm8k" / "test.jsonl").read_bytes() == payload


def test_an_offline_dataset_download_says_where_to_put_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASB_GSM8K_URL", closed_port_url())
    monkeypatch.setattr(hub_lib, "CACHE_DIR", tmp_path)
    with pytest.raises(hub_lib.DownloadError, match=r"(?s)could not download.*--data_dir"):
        datasets.gsm8k_dir(None)


def test_metamathqa_is_downloaded_from_the_hub_into_the_cache(serve, tmp_path, monkeypatch):
    rows = [{"query": f"q{i}", "response": f"r{i}\nThe answer is: {i}"} for i in range(3)]
    url, log, _ = serve({"/" + datasets.METAMATHQA_FILE: json.dumps(rows).encode()})
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(hub_lib, "CACHE_DIR", tmp_path)
    assert data.load_metamathqa(3, datasets.metamathqa_file(None)) == rows
    assert len(log) == 1 and (tmp_path / "metamathqa" / "MetaMathQA-395K.json").is_file()


def test_math_is_downloaded_into_the_cache_once(serve, tmp_path, monkeypatch):
    rows = [{"idx": "hendrycks_math_1", "instruction": "What is $1+1$?", "output": "It is $\\boxed{2}$.", "input": "",
             "type": "Prealgebra"}]
    url, log, _ = serve({"/MATH_test.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()})
    monkeypatch.setenv("LORASB_MATH_URL", url + "/MATH_test.jsonl")
    monkeypatch.setattr(hub_lib, "CACHE_DIR", tmp_path)
    expected = [{"question": "What is $1+1$?", "answer": "2", "subject": "Prealgebra"}]
    assert math_task.load_math(datasets.math_file(None)) == expected
    assert math_task.load_math(datasets.math_file(None)) == expected
    assert len(log) == 1 and (tmp_path / "math" / "MATH_test.jsonl").is_file()
    monkeypatch.setenv("LORASB_MATH_URL", closed_port_url() + "/MATH_test.jsonl")
    monkeypatch.setattr(hub_lib, "CACHE_DIR", tmp_path / "empty")
    with pytest.raises(hub_lib.DownloadError, match=r"(?s)could not download.*--math_path"):
        datasets.math_file(None)


def test_commonsense_files_are_downloaded_into_the_cache_once_unless_local(serve, tmp_path, monkeypatch):
    record = {"instruction": "Is it? Answer format: true/false", "input": "", "output": "the correct answer is true",
              "answer": "true"}
    test, train = json.dumps([record]).encode(), json.dumps([record, record]).encode()
    url, log, _ = serve({"/cs/dataset/boolq/test.json": test, "/cs/dataset/hellaswag/test.json": test,
                         "/cs/" + datasets.COMMONSENSE_TRAIN: train})
    monkeypatch.setenv("LORASB_COMMONSENSE_URL", url + "/cs")
    monkeypatch.setattr(datasets, "COMMONSENSE_TEST_SHA256", {"boolq": sha(test)})
    monkeypatch.setattr(hub_lib, "CACHE_DIR", tmp_path)
    for _ in range(2):
        assert commonsense.load_commonsense(datasets.commonsense_test_file("boolq", None), "boolq") == [record]
        hellaswag = datasets.commonsense_test_file("hellaswag", None)
        assert commonsense.load_commonsense(hellaswag) == [record]  # no pinned sha
        [path] = datasets.commonsense_train_files(None)
        assert commonsense.load_commonsense(path) == [record, record]
    assert sorted(path for path, _ in log) == ["/cs/dataset/boolq/test.json", "/cs/dataset/hellaswag/test.json",
                                               "/cs/" + datasets.COMMONSENSE_TRAIN]
    local = tmp_path / "local"
    for task in ("boolq", "ARC-Easy"):
        (local / task).mkdir(parents=True)
        (local / task / "test.json").write_text("[]")
        (local / task / "train.json").write_text("[]")
    assert datasets.commonsense_test_file("boolq", str(local)) == local / "boolq" / "test.json"
    assert datasets.commonsense_train_files(str(local)) == [local / "ARC-Easy" / "train.json",
                                                            local / "boolq" / "train.json"]
    (local / "commonsense_170k.json").write_text("[]")
    assert datasets.commonsense_train_files(str(local)) == [local / "commonsense_170k.json"]  # the union, when there
    with pytest.raises(hub_lib.DownloadError, match=r"(?s)HTTP 404.*--commonsense_dir"):  # not local: downloaded
        datasets.commonsense_test_file("piqa", str(local))


# -----------------------------------------------------------------------------
# the Hugging Face hub: where the token goes, one commit per download, the hashes it publishes

LFS_THRESHOLD = 10_000  # larger files are "LFS": redirected to storage, with their sha256 published


def git_blob_sha1(payload: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(payload) + payload).hexdigest()


@pytest.fixture
def fake_hub():
    """A loopback server laid out like the Hugging Face hub, and a storage server on a second loopback address.

    hub["commits"] maps a 40-hex commit to its files ({name: bytes}) and hub["main"] names the commit main points to.
    GET or HEAD /{org}/{name}/resolve/{main or commit}/{file} answers with X-Repo-Commit; a small file comes directly
    with its git blob sha1 as ETag; a large one redirects (302) to the storage server with its sha256 in X-Linked-Etag.
    hub["log"] lists (server, path, Authorization, Range) of every request; while hub["cut"] > 0, storage responses
    stop halfway. Returns hub, with hub["url"] the hub's base URL."""
    hub = {"commits": {}, "main": None, "log": [], "cut": 0}
    servers = []

    def start(host: str, handle) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub["log"].append((host, self.path, self.headers.get("Authorization"), self.headers.get("Range")))
                handle(self)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer((host, 0), Handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(server)
        return f"http://{host}:{server.server_address[1]}"

    def storage(handler):
        commit, name = handler.path.strip("/").split("/", 1)
        send_body(handler, hub["commits"][commit][name], False, hub)

    def resolve(handler):
        _, _, _, revision, name = handler.path.strip("/").split("/", 4)
        commit = hub["main"] if revision == "main" else revision
        body = hub["commits"].get(commit, {}).get(name)
        if body is None:
            handler.send_error(404)
        elif len(body) > LFS_THRESHOLD:
            handler.send_response(302)
            for header, value in {"Location": f"{storage_url}/{commit}/{name}", "X-Repo-Commit": commit,
                                  "X-Linked-Etag": f'"{sha(body)}"', "Content-Length": "0"}.items():
                handler.send_header(header, value)
            handler.end_headers()
        elif handler.command == "HEAD":
            handler.send_response(200)
            handler.send_header("X-Repo-Commit", commit)
            handler.end_headers()
        else:
            send_body(handler, body, False, {"cut": 0}, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(body)}"'})

    storage_url = start("127.0.0.2", storage)
    hub["url"] = start("127.0.0.1", resolve)
    yield hub
    for server in servers:
        server.shutdown()
        server.server_close()


def publish(hub: dict, weights: bytes) -> str:
    """A new commit of org/tiny with these weights, made main; returns it."""
    commit = sha(weights)[:40]
    hub["commits"][commit] = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}",
                              "model.safetensors": weights}
    hub["main"] = commit
    return commit


def test_the_token_goes_to_the_hub_and_never_to_the_storage_it_redirects_to(fake_hub, tmp_path, monkeypatch):
    publish(fake_hub, BLOB)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub["url"])
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    folder = hub_lib.download_model("org/tiny", cache_dir=tmp_path)
    assert (folder / "model.safetensors").read_bytes() == BLOB
    to_hub = [auth for server, _, auth, _ in fake_hub["log"] if server == "127.0.0.1"]
    to_storage = [auth for server, _, auth, _ in fake_hub["log"] if server == "127.0.0.2"]
    assert to_hub and set(to_hub) == {"Bearer hf_secret"}
    assert to_storage == [None]


def test_a_download_resumed_after_main_moved_finishes_the_commit_it_began(fake_hub, tmp_path, monkeypatch):
    first = publish(fake_hub, BLOB)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub["url"])
    fake_hub["cut"] = 3
    with pytest.raises(hub_lib.DownloadError, match="interrupted"):
        hub_lib.download_model("org/tiny", cache_dir=tmp_path)
    newer = bytes(b ^ 1 for b in BLOB)  # the same size: a splice of the two would load without an error
    publish(fake_hub, newer)
    folder = hub_lib.download_model("org/tiny", cache_dir=tmp_path)
    assert (folder / "model.safetensors").read_bytes() == BLOB
    fetched = [path for server, path, _, _ in fake_hub["log"] if server == "127.0.0.1"][1:]  # after the first HEAD
    assert fetched and all(f"/resolve/{first}/" in path for path in fetched)


def test_a_file_that_changed_during_a_resumed_download_fails_the_hubs_hash(fake_hub, tmp_path):
    publish(fake_hub, BLOB)
    url = f"{fake_hub['url']}/org/tiny/resolve/main/model.safetensors"
    dest = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(bytes(b ^ 1 for b in BLOB[:1000]))  # begun on another version
    with pytest.raises(hub_lib.DownloadError, match=f"sha256 mismatch.*expected {sha(BLOB)}"):
        hub_lib.download_file(url, dest)
    assert not dest.exists() and not (tmp_path / "model.safetensors.part").exists()
    assert hub_lib.download_file(url, dest).read_bytes() == BLOB  # the next call starts clean
    small = f"{fake_hub['url']}/org/tiny/resolve/main/config.json"
    (tmp_path / "config.json.part").write_bytes(b"[")  # a small file is checked against its git blob sha1
    with pytest.raises(hub_lib.DownloadError, match="git blob sha1 mismatch"):
        hub_lib.download_file(small, tmp_path / "config.json")


# -----------------------------------------------------------------------------
# resolve_model: local folder, Hugging Face cache, a hub laid out in a folder


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """An empty Hugging Face cache and no token, so the developer's own cache and credentials never leak in."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return tmp_path


class FolderHubHandler(SimpleHTTPRequestHandler):
    requests: list  # (path, Authorization header) of every request, shared by the server's handlers

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/org/gated/"):
            self.send_error(401)
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def folder_hub(tmp_path, monkeypatch):
    """A loopback HTTP server serving a folder laid out like the hub ({repo}/resolve/main/{file}) at HF_ENDPOINT;
    yields (root, log)."""
    root = tmp_path / "hub_root"
    root.mkdir()
    log = []
    handler = functools.partial(type("Handler", (FolderHubHandler,), {"requests": log}), directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield root, log
    server.shutdown()
    server.server_close()


def test_resolve_local_folder(tiny_model_dir, hub_env):
    assert hub_lib.resolve_model(tiny_model_dir) == tiny_model_dir
    assert hub_lib.resolve_model(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(FileNotFoundError, match="not a hub model name"):
        hub_lib.resolve_model(hub_env / "no" / "such" / "folder")


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_resolve_from_huggingface_cache(tiny_model_dir, hub_env, monkeypatch, env):
    hub_dir = hub_env / "hf_home" / "hub" if env == "HF_HOME" else hub_env / "hf_hub"
    if env == "HF_HOME":
        monkeypatch.delenv("HF_HUB_CACHE")
        monkeypatch.setenv("HF_HOME", str(hub_env / "hf_home"))
    root = hub_dir / "models--org--tiny"
    for commit in ("aaaa", "bbbb"):  # refs/main names bbbb; aaaa is another snapshot
        shutil.copytree(tiny_model_dir, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("bbbb")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may be downloaded
    assert hub_lib.resolve_model("org/tiny", cache_dir=hub_env / "ours") == root / "snapshots" / "bbbb"
    (root / "refs" / "main").unlink()
    shutil.rmtree(root / "snapshots" / "bbbb")
    assert hub_lib.resolve_model("org/tiny", cache_dir=hub_env / "ours") == root / "snapshots" / "aaaa"


def test_download_from_hub_then_cache(tiny_model_dir, hub_env, folder_hub, monkeypatch):
    root, log = folder_hub
    repo_dir = root / "org" / "tiny" / "resolve" / "main"
    repo_dir.mkdir(parents=True)
    shutil.copy(tiny_model_dir / "config.json", repo_dir)
    (repo_dir / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    (repo_dir / "tokenizer.json").write_text("{}")
    weight_map = write_shards(repo_dir, load_safetensors(tiny_model_dir / "model.safetensors")[0])
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    cache = hub_env / "ours"
    got = hub_lib.resolve_model("org/tiny", cache_dir=cache)
    assert got == cache / "org--tiny"
    assert {p.name for p in got.iterdir()} == ({"config.json", "generation_config.json", "tokenizer.json",
                                                safetensors_file.INDEX_FILE} | set(weight_map.values()))
    assert all(auth == "Bearer hf_secret" for _, auth in log)
    assert "/org/tiny/resolve/main/special_tokens_map.json" in [p for p, _ in log]  # tried; its 404 is fine
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        assert torch.equal(model_lib.load_model(got)(ids), model_lib.load_model(tiny_model_dir)(ids))
    before = len(log)
    assert hub_lib.resolve_model("org/tiny", cache_dir=cache) == got
    assert len(log) == before  # the second call downloads nothing


def test_download_errors(hub_env, folder_hub, monkeypatch):
    root, _ = folder_hub
    with pytest.raises(OSError, match="HTTP 404.*is org/missing a model repository.*--model /path/to/folder"):
        hub_lib.resolve_model("org/missing", cache_dir=hub_env / "ours")
    with pytest.raises(OSError, match="HTTP 401.*accept its license on the hub and set HF_TOKEN"):
        hub_lib.resolve_model("org/gated", cache_dir=hub_env / "ours")
    repo_dir = root / "org" / "evil" / "resolve" / "main"
    repo_dir.mkdir(parents=True)
    (repo_dir / "tokenizer.json").write_text("{}")
    (repo_dir / safetensors_file.INDEX_FILE).write_text(json.dumps({"weight_map": {"w": "../../escape.safetensors"}}))
    with pytest.raises(ValueError, match="plain file names"):
        hub_lib.resolve_model("org/evil", cache_dir=hub_env / "ours")
    (repo_dir / safetensors_file.INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        hub_lib.resolve_model("org/evil", cache_dir=hub_env / "fresh")  # "ours" keeps the index it fetched
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())  # nobody listening: offline as far as we can tell
    with pytest.raises(OSError, match="pass it: --model /path/to/folder"):
        hub_lib.resolve_model("org/tiny", cache_dir=hub_env / "ours")
