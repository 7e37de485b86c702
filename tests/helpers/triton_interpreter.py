"""Run a snippet of Triton kernel checks in a fresh process under ``TRITON_INTERPRET=1``.

The interpreter is chosen when kernels are decorated, so the modules must be imported anew:
a subprocess at the repository root. The snippet must print ``ok`` when its checks pass.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_in_triton_interpreter(code: str) -> None:
    """Skip without Triton or with a GPU (the compiled kernels are checked there); else run
    ``code`` under the interpreter and fail with its stderr unless it printed ``ok``."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():  # and Triton 3.6's interpreter cannot loop to an int argument
        pytest.skip("the compiled kernels are checked on this GPU")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
