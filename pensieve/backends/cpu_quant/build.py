"""Compile the kernel source once, cache the library, load it with ctypes.

The library is keyed by a hash of the source, the flags and the compiler binary, and lives in
``$PENSIEVE_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/pensieve/kernels``, i.e.
``~/.cache/pensieve/kernels``). A build writes to a temporary name and renames it into place,
so concurrent processes never load a half-written file. Anything that goes wrong — not x86-64,
no AVX2, no compiler, a failed compile — is logged once as a warning and gives ``None``:
callers keep the float path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pensieve.backends.cpu_quant.source import KERNEL_SOURCE

log = logging.getLogger(__name__)

ABI_VERSION = 19
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fPIC", "-shared", "-std=c++17", "-pthread")

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "pq4_linear": (_P, _I64, _I64, _P, _P, _P, _I64, _P, _P, _INT),
    "pq8_linear": (_P, _I64, _I64, _P, _P, _I64, _P, _P, _INT),
    "pq4_small": (_P, _I64, _I64, _P, _P, _P, _I64, _P, _P, _INT),
    "pq4_gemm": (_P, _I64, _I64, _P, _P, _P, _I64, _P, _P, _INT),
    "pq8_small": (_P, _I64, _I64, _P, _P, _I64, _P, _P, _INT),
    "pq8_gemm": (_P, _I64, _I64, _P, _P, _I64, _P, _P, _INT),
    "pq4_dequant": (_P, _P, _P, _I64, _I64, _P, _INT),
    "pq8_dequant": (_P, _P, _I64, _I64, _P, _INT),
    "pq8_rows": (_P, _P, _I64, _P, _I64, _I64, _P),
    "pq4_pack": (_P, _P, _P, _I64, _I64, _P, _P, _P),
    "pq8_pack": (_P, _I64, _I64, _P, _P),
    "pq6_pack": (_P, _I64, _I64, _P),
    "pq4_mlp": (_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _INT),
    "pqx_linear": (_P, _I64, _P, _P, _INT, _INT),
    "pqx_mlp": (_P, _I64, _P, _P, _P, _INT),
    "pqx_moe_rows": (_P, _P, _I64, _P, _P, _I64, _P, _INT),
    "pqx_dequant": (_P, _P, _INT),
    "pqx_rows": (_P, _P, _I64, _P),
    "pqx_dequant_bf16": (_P, _I64, _I64, _P, _INT, _INT),
    "pqx_bf16_isa": (),
    "pq_set_isa": (_INT,),
    "pq_set_act8": (_INT,),
    "pq_release_scratch": (),
    "pq_decode_profile": (_INT, _P),
    "pq_prefill_attention": (_P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _I64, _P, _P, _F, _P,
                             _I64, _INT, _INT),
    "pq_rmsnorm": (_P, _I64, _I64, _I64, _P, _F, _P),
    "pq_rope_store": (_P, _I64, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P,
                      _INT),
    "pq_paged_decode": (_P, _I64, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _I64, _F, _P,
                        _I64, _INT, _INT),
    "pq_moe_route": (_P, _I64, _I64, _P, _P, _P),
    "pq_decode_layers": (_P, _I64, _I64, _I64, _I64, _P, _F, _I64, _I64, _I64, _P, _P, _P, _P, _P,
                         _P, _I64, _INT, _INT),
}
RESTYPES = {"pq8_rows": _I64, "pqx_rows": _I64, "pqx_moe_rows": _I64, "pqx_bf16_isa": _INT,
            "pq_set_isa": _INT, "pq_set_act8": _INT, "pq_prefill_attention": _INT,
            "pq_decode_profile": _INT}
ISAS = ("avx2", "avx512_vnni")  # the row tiles' instruction sets, as pq_set_isa numbers them
VNNI_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")


@dataclass(frozen=True)
class Kernels:
    """The loaded library: call its functions with raw pointers (``tensor.data_ptr()``)."""

    lib: ctypes.CDLL
    path: Path
    build_seconds: float  # 0.0 when it came from the cache

    @property
    def isa(self) -> str:
        """The instruction set the row tiles run on now (``ISAS``)."""
        return ISAS[self.lib.pq_set_isa(-1)]

    def set_isa(self, isa: str) -> str:
        """Run the row tiles on ``isa`` (``ISAS``) where this CPU has it; the one in effect.
        Process-wide (tests and benchmarks switch it to compare both)."""
        return ISAS[self.lib.pq_set_isa(ISAS.index(isa))]

    @property
    def act8(self) -> bool:
        """Whether the panel GEMM (prefill) runs on int8 activations (``vnni8_gemm_source``)."""
        return bool(self.lib.pq_set_act8(-1)) and self.isa == "avx512_vnni"

    def set_act8(self, on: bool) -> bool:
        """int8 activations in the VNNI panel GEMM (off: int16); only where the VNNI kernels run.
        Process-wide; the setting in effect."""
        self.lib.pq_set_act8(int(on))
        return self.act8

    def __getattr__(self, name: str):  # lib functions by name: kernels.pq4_linear(...)
        if name in SIGNATURES:
            return getattr(self.lib, name)
        raise AttributeError(name)


def cache_dir() -> Path:
    env = os.environ.get("PENSIEVE_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pensieve" / "kernels"


FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
            "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_features() -> tuple[str, ...]:
    """Which of ``FEATURES`` this CPU reports (``/proc/cpuinfo`` flags, as the kernel sees
    them: a flag the hypervisor hides is absent); empty off Linux/x86-64."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(x for x in FEATURES if x in flags)
    except OSError:
        pass
    return ()


def default_isa() -> str:
    """The row tiles' instruction set for this CPU: AVX-512 VNNI where ``/proc/cpuinfo`` has
    it, else AVX2; ``PENSIEVE_CPU_ISA=avx2`` forces the fallback (``avx512_vnni`` asks for
    VNNI, still only where the CPU has it)."""
    want = os.environ.get("PENSIEVE_CPU_ISA", "").strip().lower()
    if want == "avx2":
        return "avx2"
    have = cpu_features()
    return "avx512_vnni" if all(f in have for f in VNNI_FEATURES) else "avx2"


def cpu_supported() -> bool:
    """x86-64 with AVX2 (which every such CPU pairs with FMA and F16C)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (found := shutil.which(name)):
            return found
    return None


def _key(compiler: str, flags: tuple[str, ...]) -> str:
    real = Path(compiler).resolve()
    stat = real.stat()
    text = "\0".join([KERNEL_SOURCE, *flags, str(real), str(stat.st_size), str(stat.st_mtime_ns)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        src, out = Path(tmp) / "cpu_quant.cpp", Path(tmp) / "cpu_quant.so"
        src.write_text(KERNEL_SOURCE)
        proc = subprocess.run(
            [compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(out, target)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.pq_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path}: ABI {lib.pq_abi_version()}, expected {ABI_VERSION}")
    for name, args in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, RESTYPES.get(name)
    return lib


class KernelBuildError(RuntimeError):
    """The kernels cannot be built or loaded here (CPU, compiler, or compile error)."""


def build_kernels(cache: Path | None = None, compiler: str | None = None) -> Kernels:
    """Compile (unless cached) and load the kernels; raises ``KernelBuildError``."""
    if not cpu_supported():
        raise KernelBuildError(f"no AVX2 on this CPU ({platform.machine()})")
    compiler = compiler or _compiler()
    if compiler is None or shutil.which(compiler) is None:
        raise KernelBuildError("no C++ compiler (set CXX, or install g++)")
    compiler = shutil.which(compiler) or compiler
    target = (cache or cache_dir()) / f"cpu_quant-{_key(compiler, FLAGS)}.so"
    start = time.perf_counter()
    seconds = 0.0
    try:
        if not target.exists():
            log.info("compiling CPU quantised kernels → %s", target)
            _compile(compiler, FLAGS, target)
            seconds = time.perf_counter() - start
            log.info("CPU quantised kernels compiled in %.1f s", seconds)
        kernels = Kernels(_load(target), target, seconds)
        kernels.set_isa(default_isa())
        kernels.set_act8(os.environ.get("PENSIEVE_CPU_ACT8", "0").strip() == "1")
        return kernels
    except (OSError, RuntimeError, AttributeError) as e:
        raise KernelBuildError(str(e)) from e


_lock = threading.Lock()
_loaded: list[Kernels | None] = []  # the process's one load attempt (a build cache, not state)


def load_kernels() -> Kernels | None:
    """The kernels, built on first use and cached on disk; None (warned once) if unavailable.

    This is the start-up build step (``kernel_choice.choose`` calls it): ~3 s the first time
    on a machine, a ``dlopen`` after that. ``PENSIEVE_CPU_KERNELS=0`` turns the kernels off.
    """
    with _lock:
        if not _loaded:
            kernels = None
            if os.environ.get("PENSIEVE_CPU_KERNELS", "1") != "0":
                try:
                    kernels = build_kernels()
                except KernelBuildError as e:
                    log.warning("CPU quantised kernels unavailable, using float weights: %s", e)
            _loaded.append(kernels)
        return _loaded[0]
