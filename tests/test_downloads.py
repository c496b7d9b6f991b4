"""Downloads (model.py's one home for network I/O) against loopback servers: resume, checksums, errors, and the
dataset files train_gsm8k.py fetches into the cache."""

import hashlib
import json
import random
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import data
import model as M
import train_gsm8k


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
    assert M.download_file(url + "/f.bin", dest, sha256=sha(BLOB)) == dest
    assert dest.read_bytes() == BLOB and not (tmp_path / "sub" / "f.bin.part").exists()
    M.download_file(url + "/f.bin", dest, sha256=sha(BLOB))
    assert len(log) == 1  # present with the right hash: no second request


def test_download_checksum_mismatch_leaves_no_file(serve, tmp_path):
    url, _, _ = serve({"/f.bin": BLOB})
    dest = tmp_path / "f.bin"
    with pytest.raises(M.DownloadError) as e:
        M.download_file(url + "/f.bin", dest, sha256="0" * 64)
    assert str(dest) in str(e.value) and "0" * 64 in str(e.value) and sha(BLOB) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_resumes_a_cut_transfer_with_range(serve, tmp_path):
    url, log, _ = serve({"/f.bin": BLOB}, cut=1)
    dest = M.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert dest.read_bytes() == BLOB
    assert log == [("/f.bin", None), ("/f.bin", f"bytes={len(BLOB) // 2}-")]


def test_download_resumes_a_partial_file_from_an_earlier_run(serve, tmp_path):
    url, log, _ = serve({"/f.bin": BLOB})
    (tmp_path / "f.bin.part").write_bytes(BLOB[:1000])
    M.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert (tmp_path / "f.bin").read_bytes() == BLOB and log == [("/f.bin", "bytes=1000-")]


def test_download_restarts_when_the_server_ignores_range(serve, tmp_path):
    url, log, _ = serve({"/f.bin": BLOB}, ignore_range=True)
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # would corrupt the file if appended to
    M.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert (tmp_path / "f.bin").read_bytes() == BLOB and log == [("/f.bin", "bytes=1000-")]


def test_download_restarts_after_416_on_a_too_long_partial_file(serve, tmp_path):
    url, log, _ = serve({"/f.bin": BLOB})
    (tmp_path / "f.bin.part").write_bytes(BLOB + b"extra")
    M.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert (tmp_path / "f.bin").read_bytes() == BLOB and log[-1] == ("/f.bin", None)


def test_download_keeps_the_partial_file_when_cut_repeatedly_and_resumes_later(serve, tmp_path):
    url, log, state = serve({"/f.bin": BLOB}, cut=10)
    with pytest.raises(M.DownloadError, match="interrupted.*run again to resume"):
        M.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    part = tmp_path / "f.bin.part"
    kept = part.stat().st_size
    assert len(log) == 3 and 0 < kept < len(BLOB) and not (tmp_path / "f.bin").exists()
    state["cut"] = 0
    M.download_file(url + "/f.bin", tmp_path / "f.bin", sha256=sha(BLOB))
    assert (tmp_path / "f.bin").read_bytes() == BLOB and log[-1] == ("/f.bin", f"bytes={kept}-")


def test_download_errors_name_the_url(serve, tmp_path):
    offline = closed_port_url() + "/f.bin"
    with pytest.raises(M.DownloadError, match=offline):
        M.download_file(offline, tmp_path / "f.bin")
    url, _, _ = serve({})
    with pytest.raises(M.DownloadError, match="HTTP 404") as e:
        M.download_file(url + "/missing.bin", tmp_path / "f.bin")
    assert e.value.__cause__.code == 404  # model.py reads the HTTP status from the cause
    assert issubclass(M.DownloadError, OSError)


def test_gsm8k_is_downloaded_into_the_cache_once(serve, tmp_path, monkeypatch):
    rows = [{"question": "What is 2 + 2?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}]
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    url, log, _ = serve({"/gsm/test.jsonl": payload})
    monkeypatch.setenv("LORASB_GSM8K_URL", url + "/gsm")
    monkeypatch.setattr(data, "GSM8K_SHA256", {"test": sha(payload)})
    monkeypatch.setattr(M, "CACHE_DIR", tmp_path)
    assert data.load_gsm8k("test", train_gsm8k.gsm8k_dir(None)) == rows
    assert data.load_gsm8k("test", train_gsm8k.gsm8k_dir(None)) == rows
    assert len(log) == 1 and (tmp_path / "gsm8k" / "test.jsonl").read_bytes() == payload


def test_an_offline_dataset_download_says_where_to_put_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASB_GSM8K_URL", closed_port_url())
    monkeypatch.setattr(M, "CACHE_DIR", tmp_path)
    with pytest.raises(M.DownloadError, match=r"(?s)could not download.*--data_dir"):
        train_gsm8k.gsm8k_dir(None)


def test_metamathqa_is_downloaded_from_the_hub_into_the_cache(serve, tmp_path, monkeypatch):
    rows = [{"query": f"q{i}", "response": f"r{i}\nThe answer is: {i}"} for i in range(3)]
    url, log, _ = serve({"/" + data.METAMATHQA_FILE: json.dumps(rows).encode()})
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(M, "CACHE_DIR", tmp_path)
    assert data.load_metamathqa(3, train_gsm8k.metamathqa_file(None)) == rows
    assert len(log) == 1 and (tmp_path / "metamathqa" / "MetaMathQA-395K.json").is_file()


def test_math_is_downloaded_into_the_cache_once(serve, tmp_path, monkeypatch):
    rows = [{"idx": "hendrycks_math_1", "instruction": "What is $1+1$?", "output": "It is $\\boxed{2}$.", "input": "",
             "type": "Prealgebra"}]
    url, log, _ = serve({"/MATH_test.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()})
    monkeypatch.setenv("LORASB_MATH_URL", url + "/MATH_test.jsonl")
    monkeypatch.setattr(M, "CACHE_DIR", tmp_path)
    expected = [{"question": "What is $1+1$?", "answer": "2", "subject": "Prealgebra"}]
    assert data.load_math(train_gsm8k.math_file(None)) == expected
    assert data.load_math(train_gsm8k.math_file(None)) == expected
    assert len(log) == 1 and (tmp_path / "math" / "MATH_test.jsonl").is_file()
    monkeypatch.setenv("LORASB_MATH_URL", closed_port_url() + "/MATH_test.jsonl")
    monkeypatch.setattr(M, "CACHE_DIR", tmp_path / "empty")
    with pytest.raises(M.DownloadError, match=r"(?s)could not download.*--math_path"):
        train_gsm8k.math_file(None)


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
    folder = M.download_model("org/tiny", cache_dir=tmp_path)
    assert (folder / "model.safetensors").read_bytes() == BLOB
    to_hub = [auth for server, _, auth, _ in fake_hub["log"] if server == "127.0.0.1"]
    to_storage = [auth for server, _, auth, _ in fake_hub["log"] if server == "127.0.0.2"]
    assert to_hub and set(to_hub) == {"Bearer hf_secret"}
    assert to_storage == [None]


def test_a_download_resumed_after_main_moved_finishes_the_commit_it_began(fake_hub, tmp_path, monkeypatch):
    first = publish(fake_hub, BLOB)
    monkeypatch.setenv("HF_ENDPOINT", fake_hub["url"])
    fake_hub["cut"] = 3
    with pytest.raises(M.DownloadError, match="interrupted"):
        M.download_model("org/tiny", cache_dir=tmp_path)
    newer = bytes(b ^ 1 for b in BLOB)  # the same size: a splice of the two would load without an error
    publish(fake_hub, newer)
    folder = M.download_model("org/tiny", cache_dir=tmp_path)
    assert (folder / "model.safetensors").read_bytes() == BLOB
    fetched = [path for server, path, _, _ in fake_hub["log"] if server == "127.0.0.1"][1:]  # after the first HEAD
    assert fetched and all(f"/resolve/{first}/" in path for path in fetched)


def test_a_file_that_changed_during_a_resumed_download_fails_the_hubs_hash(fake_hub, tmp_path):
    publish(fake_hub, BLOB)
    url = f"{fake_hub['url']}/org/tiny/resolve/main/model.safetensors"
    dest = tmp_path / "model.safetensors"
    (tmp_path / "model.safetensors.part").write_bytes(bytes(b ^ 1 for b in BLOB[:1000]))  # begun on another version
    with pytest.raises(M.DownloadError, match=f"sha256 mismatch.*expected {sha(BLOB)}"):
        M.download_file(url, dest)
    assert not dest.exists() and not (tmp_path / "model.safetensors.part").exists()
    assert M.download_file(url, dest).read_bytes() == BLOB  # the next call starts clean
    small = f"{fake_hub['url']}/org/tiny/resolve/main/config.json"
    (tmp_path / "config.json.part").write_bytes(b"[")  # a small file is checked against its git blob sha1
    with pytest.raises(M.DownloadError, match="git blob sha1 mismatch"):
        M.download_file(small, tmp_path / "config.json")
