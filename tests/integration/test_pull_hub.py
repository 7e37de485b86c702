"""``pensieve pull hf:…`` through the real ``huggingface_hub`` client against a loopback server
that speaks the hub's file API (the hub itself is unreachable here): the model-info API with
file metadata, and ``resolve/{revision}/{file}`` with ``X-Repo-Commit``, ``ETag``,
``Content-Length`` and HTTP Range for resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pensieve.store import ModelStore, StoreError, resolve_model
from pensieve.store.pull import pull
from tests.helpers.server import free_port
from tests.unit.test_store_models import split_gguf, tiny_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """Repos (repo id → {file name → bytes}) served the way the hub serves them."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (file, Range header) of GETs
    cut_first_get: set[str] = field(default_factory=set)  # send half, then drop the connection
    fail_gets: set[str] = field(default_factory=set)  # answer 500 until removed
    url: str = ""


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = self.path.split("?", 1)[0]
            m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$", path)
            if m:
                return self._info(m.group(1))
            m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
            if m and m.group(1) in hub.repos and m.group(3) in hub.repos[m.group(1)]:
                return self._file(hub.repos[m.group(1)][m.group(3)], m.group(3), body)
            self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

        def _info(self, repo: str) -> None:
            if repo not in hub.repos:
                return self._json(404, {"error": "Repository not found"},
                                  {"X-Error-Code": "RepoNotFound"})
            siblings = [{"rfilename": n, "size": len(d), "blobId": "b" * 40,
                         "lfs": {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d),
                                 "pointerSize": 134}}
                        for n, d in sorted(hub.repos[repo].items())]
            self._json(200, {"_id": "x", "id": repo, "modelId": repo, "sha": COMMIT,
                             "private": False, "siblings": siblings})

        def _file(self, data: bytes, name: str, body: bool) -> None:
            digest = hashlib.sha256(data).hexdigest()
            common = {"X-Repo-Commit": COMMIT, "ETag": f'"{digest}"', "Accept-Ranges": "bytes"}
            if not body:
                self.send_response(200)
                for k, v in {**common, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                return
            rng = self.headers.get("Range", "")
            hub.ranges.append((name, rng))
            if name in hub.fail_gets:
                return self._json(500, {"error": "internal error"})
            start = int(re.match(r"bytes=(\d+)-", rng).group(1)) if rng else 0
            part = data[start:]
            self.send_response(206 if start else 200)
            for k, v in {**common, "Content-Length": str(len(part))}.items():
                self.send_header(k, v)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if name in hub.cut_first_get:
                hub.cut_first_get.discard(name)
                hub.fail_gets.add(name)  # the retry fails too: this pull stops half-way
                self.wfile.write(part[: len(part) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(part)

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "5")
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_a_quant_tag_picks_one_gguf_and_a_cut_download_resumes(hub: FakeHub, tmp_path: Path) -> None:
    q4 = tiny_gguf(tmp_path / "q4.gguf", tensors=4, context=2048).read_bytes()
    q8 = tiny_gguf(tmp_path / "q8.gguf", tensors=2).read_bytes()
    hub.repos["org/Tiny-GGUF"] = {"tiny-Q4_K_M.gguf": q4, "tiny-Q8_0.gguf": q8,
                                  "README.md": b"# tiny\n"}
    hub.cut_first_get.add("tiny-Q4_K_M.gguf")
    store = ModelStore(tmp_path / "store")
    with pytest.raises(StoreError, match="run the pull again"):
        pull("hf:org/Tiny-GGUF:Q4_K_M", store)
    assert store.list() == []  # nothing half-done is listed
    hub.fail_gets.clear()
    manifest = pull("hf:org/Tiny-GGUF:Q4_K_M", store)
    got = [r for n, r in hub.ranges if n == "tiny-Q4_K_M.gguf"]
    assert got[0] == "" and got[-1].startswith("bytes=") and got[-1] != "bytes=0-"  # resumed
    assert all(n == "tiny-Q4_K_M.gguf" for n, _ in hub.ranges)  # Q8_0 never fetched
    assert manifest.name == "org/Tiny-GGUF:Q4_K_M"
    assert manifest.sha256 == hashlib.sha256(q4).hexdigest()
    assert (manifest.architecture, manifest.context_length, manifest.size) == ("llama", 2048, len(q4))
    assert resolve_model("org/Tiny-GGUF:Q4_K_M", store).read_bytes() == q4
    assert sorted(p.name for p in store.folder(manifest.name).iterdir()) == [
        "manifest.json", "tiny-Q4_K_M.gguf"]  # no resume state left behind


def test_a_split_gguf_is_joined_into_one_file(hub: FakeHub, tmp_path: Path) -> None:
    from pensieve.loaders.gguf_file import GGUFFile

    original = tiny_gguf(tmp_path / "orig.gguf", tensors=5, context=512)
    shards = split_gguf(original, tmp_path / "big-Q4_K_M", max_tensors=2)
    hub.repos["org/Big-GGUF"] = {p.name: p.read_bytes() for p in shards}
    store = ModelStore(tmp_path / "store")
    manifest = pull("hf:org/Big-GGUF:Q4_K_M", store)
    path = resolve_model(manifest.name, store)
    assert path.name == "big-Q4_K_M.gguf" and manifest.entry == "big-Q4_K_M.gguf"
    a, b = GGUFFile(original), GGUFFile(path)
    assert all(bytes(a.raw(n).numpy()) == bytes(b.raw(n).numpy()) for n in a.tensors)
    assert list(a.tensors) == list(b.tensors)
    assert manifest.context_length == 512 and len(manifest.files) == 1


def test_a_safetensors_folder_keeps_its_generation_config(hub: FakeHub, tmp_path: Path) -> None:
    files = {"config.json": json.dumps({"model_type": "llama",
                                        "max_position_embeddings": 4096}).encode(),
             "generation_config.json": json.dumps({"temperature": 0.6, "top_p": 0.9}).encode(),
             "model.safetensors": os.urandom(1000), "tokenizer.json": b"{}",
             "original/consolidated.pth": b"x" * 100}
    hub.repos["org/tiny-hf"] = files
    store = ModelStore(tmp_path / "store")
    manifest = pull("hf:org/tiny-hf", store)
    folder = resolve_model("org/tiny-hf", store)
    assert (manifest.format, manifest.architecture, manifest.context_length) == ("hf", "llama", 4096)
    assert manifest.params.temperature == 0.6 and manifest.params.top_p == 0.9
    assert (folder / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert not (folder / "original").exists()
    assert sorted(f.name for f in manifest.files) == ["config.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json"]


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pensieve.cli.main", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_a_missing_repo_or_an_unreachable_hub_is_one_clear_line(hub: FakeHub, tmp_path: Path) -> None:
    env = {"PENSIEVE_HOME": str(tmp_path / "home"), "HF_ENDPOINT": hub.url}
    missing = _cli("pull", "hf:org/nothing-here:Q4_K_M", env=env)
    assert missing.returncode == 1
    assert "no such repo" in missing.stderr and "Traceback" not in missing.stderr
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    down = _cli("pull", "hf:org/Tiny-GGUF:Q4_K_M", env={**env, "HF_ENDPOINT": closed})
    assert down.returncode == 1 and "Traceback" not in down.stderr
    lines = [ln for ln in down.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "cannot reach the Hugging Face Hub" in lines[0]
    assert "HF_ENDPOINT" in lines[0] and "pull again" in lines[0]
    assert not list((tmp_path / "home" / "models").glob("*"))  # nothing left behind
