"""`pensieve claude`: the launcher, with a fake `claude` executable (a shell script that
records its arguments and environment) against a scripted server or a real `pensieve serve`
of a tiny GGUF. The real Claude Code CLI is driven in tests/e2e."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import httpx
import pytest

from pensieve.cli import claude as launcher
from pensieve.cli.main import main
from tests.helpers.api_fakes import ScriptedEngine, fake_server, text_script
from tests.helpers.server import free_port

FAKE_CLAUDE = """#!/bin/sh
# A stand-in for Claude Code: records its arguments and environment, exits as told.
printf '%s\\n' "$@" > "$FAKE_CLAUDE_OUT/args"
env > "$FAKE_CLAUDE_OUT/env"
exit "${FAKE_CLAUDE_EXIT:-0}"
"""


@pytest.fixture
def fake_claude(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "claude"
    path.parent.mkdir()
    path.write_text(FAKE_CLAUDE)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh HOME (the user's own ~/.claude must never be touched)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def env(tmp_path: Path, home: Path, fake_claude: Path) -> dict[str, str]:
    out = tmp_path / "out"
    out.mkdir()
    return {"HOME": str(home), "PATH": f"{fake_claude.parent}:/usr/bin:/bin",
            "PENSIEVE_HOME": str(tmp_path / "pensieve-home"), "FAKE_CLAUDE_OUT": str(out),
            "ANTHROPIC_AUTH_TOKEN": "users-real-token", "LANG": "C.UTF-8"}


@pytest.fixture
def server_url():
    with fake_server(ScriptedEngine(text_script("hi")), model_id="tiny-model",
                     context_length=4096) as url:
        yield url


def recorded(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    out = Path(env["FAKE_CLAUDE_OUT"])
    args = out.joinpath("args").read_text().splitlines()
    child = dict(line.split("=", 1) for line in out.joinpath("env").read_text().splitlines()
                 if "=" in line)
    return args, child


def test_runs_claude_against_a_running_server(server_url, env, home, capsys):
    code = launcher.run(["--url", server_url, "-p", "hello world", "--model", "x",
                         "--output-format", "stream-json"], env)
    assert code == 0
    args, child = recorded(env)
    assert args == ["-p", "hello world", "--model", "x", "--output-format", "stream-json"]
    assert child["ANTHROPIC_BASE_URL"] == server_url
    assert child["ANTHROPIC_API_KEY"] == launcher.PLACEHOLDER_KEY
    for slot in ("ANTHROPIC_MODEL", "ANTHROPIC_DEFAULT_SONNET_MODEL", "ANTHROPIC_DEFAULT_OPUS_MODEL",
                 "ANTHROPIC_DEFAULT_HAIKU_MODEL", "ANTHROPIC_SMALL_FAST_MODEL"):
        assert child[slot] == "tiny-model"
    for flag in ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "DISABLE_TELEMETRY", "DISABLE_AUTOUPDATER"):
        assert child[flag] == "1"
    assert "ANTHROPIC_AUTH_TOKEN" not in child  # the user's own credentials stay out
    assert child["HOME"] == str(home)
    config_dir = Path(env["PENSIEVE_HOME"]) / "claude-config"
    assert child["CLAUDE_CONFIG_DIR"] == str(config_dir.resolve())
    assert not (home / ".claude").exists() and not (home / ".claude.json").exists()
    state = json.loads((config_dir / ".claude.json").read_text())
    assert state["customApiKeyResponses"]["approved"] == [launcher.PLACEHOLDER_KEY[-20:]]
    assert state["hasCompletedOnboarding"] is True
    err = capsys.readouterr().err
    assert "tiny-model, context 4096 tokens" in err
    assert "--context-length 32768" in err  # Claude Code's default request would not fit


def test_exit_code_propagates_and_config_state_is_kept(server_url, env, tmp_path):
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    (config_dir / ".claude.json").write_text(json.dumps({"theme": "dark", "userID": "u1"}))
    env["FAKE_CLAUDE_EXIT"] = "3"
    assert launcher.run(["--url", server_url, "--config-dir", str(config_dir)], env) == 3
    state = json.loads((config_dir / ".claude.json").read_text())
    assert state["theme"] == "dark" and state["userID"] == "u1"  # merged, not replaced
    env["FAKE_CLAUDE_EXIT"] = "0"
    assert launcher.run(["--url", server_url, "--config-dir", str(config_dir)], env) == 0
    assert json.loads((config_dir / ".claude.json").read_text()) == state  # idempotent


def test_claude_not_installed_names_the_npm_package(server_url, env, capsys):
    env["PATH"] = "/nonexistent"
    assert launcher.run(["--url", server_url, "-p", "hi"], env) == launcher.EXIT_NOT_INSTALLED
    err = capsys.readouterr().err
    assert "Claude Code is not installed" in err
    assert "npm install -g @anthropic-ai/claude-code" in err
    env["PENSIEVE_CLAUDE_BIN"] = "/nonexistent/claude"
    assert launcher.run(["--url", server_url], env) == 127
    assert "'/nonexistent/claude' is not an executable" in capsys.readouterr().err


def test_claude_bin_option_and_environment(server_url, env, fake_claude):
    env["PATH"] = "/usr/bin:/bin"
    env["PENSIEVE_CLAUDE_BIN"] = str(fake_claude)
    assert launcher.run(["--url", server_url, "one"], env) == 0
    assert recorded(env)[0] == ["one"]
    del env["PENSIEVE_CLAUDE_BIN"]
    assert launcher.run([f"--claude-bin={fake_claude}", "--url", server_url, "--", "--url", "x"],
                        env) == 0
    assert recorded(env)[0] == ["--url", "x"]


def test_a_server_with_a_key(env):
    with fake_server(ScriptedEngine(text_script("hi")), api_keys=("sekret",)) as url:
        assert launcher.run(["--url", url], env) == 1
        assert launcher.run(["--url", url, "--api-key", "sekret"], env) == 0
        assert recorded(env)[1]["ANTHROPIC_API_KEY"] == "sekret"
        env["PENSIEVE_API_KEY"] = "other,sekret"  # the first listed is the one used
        assert launcher.run(["--url", url], env) == 1


def test_user_timeout_wins_and_default_is_long(server_url, env):
    assert launcher.run(["--url", server_url], env) == 0
    assert recorded(env)[1]["API_TIMEOUT_MS"] == launcher.LONG_REQUEST_TIMEOUT_MS
    env["API_TIMEOUT_MS"] = "1234"
    assert launcher.run(["--url", server_url], env) == 0
    assert recorded(env)[1]["API_TIMEOUT_MS"] == "1234"


def test_the_users_own_claude_config_is_refused(server_url, env, home, capsys):
    assert launcher.run(["--url", server_url, "--config-dir", str(home / ".claude")], env) == 2
    assert "your own Claude Code config" in capsys.readouterr().err
    assert not (home / ".claude").exists()


def test_no_server_and_a_url_that_cannot_be_started(env, capsys):
    assert launcher.run(["--url", "https://127.0.0.1:1"], env) == 1
    assert "only a loopback http:// URL can be started" in capsys.readouterr().err


@pytest.mark.parametrize("argv, own, rest", [
    ([], [], []),
    (["-p", "hi"], [], ["-p", "hi"]),
    (["--model", "m.gguf", "-p", "hi", "--model", "x"], ["--model=m.gguf"], ["-p", "hi", "--model", "x"]),
    (["--keep-server", "--url=http://h:1", "--", "--keep-server"],
     ["--keep-server", "--url=http://h:1"], ["--keep-server"]),
    (["--serve-arg", "--threads=2", "--serve-arg", "--dtype=bfloat16"],
     ["--serve-arg=--threads=2", "--serve-arg=--dtype=bfloat16"], []),
    (["--mod", "x"], [], ["--mod", "x"]),  # no abbreviations: unknown → Claude Code's
])
def test_split_argv(argv, own, rest):
    assert launcher.split_argv(argv) == (own, rest)


def test_option_without_value_is_an_error(env, capsys):
    assert launcher.run(["--url"], env) == 2
    assert "--url wants a value" in capsys.readouterr().err


def test_main_dispatches_claude_without_argparse(server_url, env, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["claude", "--url", server_url, "-p", "--verbose"]) == 0
    assert recorded(env)[0] == ["-p", "--verbose"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from tests.unit.loader_fixtures import TinyLlama, write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", TinyLlama())


@pytest.mark.slow
def test_starts_a_server_when_none_answers_and_stops_it_after(env, tiny_gguf, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code = launcher.run(["--url", url, "--model", str(tiny_gguf), "--context-length", "2048",
                         "-p", "hi"], env)
    assert code == 0
    child = recorded(env)[1]
    assert child["ANTHROPIC_BASE_URL"] == url and child["ANTHROPIC_MODEL"] == "tiny"
    err = capsys.readouterr().err
    assert f"starting pensieve serve on {url}" in err
    assert "(tiny, context 2048 tokens)" in err  # above the trained 512: RoPE-scaled
    assert not launcher.server_is_up(url)  # stopped with Claude Code
    log = (Path(env["PENSIEVE_HOME"]) / "logs" / f"serve-{url.rsplit(':', 1)[1]}.log").read_text()
    assert "yarn RoPE scaling x4" in log


@pytest.mark.slow
def test_keep_server_leaves_it_running_for_the_next_launch(env, tiny_gguf, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert launcher.run(["--url", url, "--model", str(tiny_gguf), "--keep-server"], env) == 0
    pid = int(re.search(r"pid (\d+)", capsys.readouterr().err).group(1))
    try:
        assert launcher.server_is_up(url)
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_input_tokens"] == 512
        assert launcher.run(["--url", url, "--model", "ignored.gguf"], env) == 0
        err = capsys.readouterr().err
        assert "starting" not in err and "ignoring --model ignored.gguf" in err
    finally:
        os.kill(pid, 15)


@pytest.mark.slow
def test_a_server_that_cannot_start_is_reported(env, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    missing = tmp_path / "missing.gguf"
    assert launcher.run(["--url", url, "--model", str(missing)], env) == 1
    err = capsys.readouterr().err
    assert "pensieve serve exited with" in err and "missing.gguf" in err
