"""`pensieve serve` asks torch's CUDA allocator for expandable segments unless the user
configured the allocator (either variable name), before anything touches CUDA."""

from __future__ import annotations

import os
import subprocess
import sys

from pensieve.cli.serve import cuda_allocator_defaults


def test_expandable_segments_by_default():
    env: dict[str, str] = {}
    cuda_allocator_defaults(env)
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}


def test_a_users_allocator_settings_are_kept():
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env = {name: "max_split_size_mb:128"}
        cuda_allocator_defaults(env)
        assert env == {name: "max_split_size_mb:128"}


def test_the_serve_command_sets_it_before_loading(tmp_path):
    """The command itself (not only the helper): a serve that fails at its bind check still
    ran the default first — the process environment shows it."""
    code = ("import os, sys\n"
            "from pensieve.cli import main as m\n"
            "rc = m.main(['serve', '--host', '0.0.0.0', '--port', '1'])\n"
            "print('ALLOC=' + os.environ.get('PYTORCH_ALLOC_CONF', ''))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF",
                                                            "PYTORCH_CUDA_ALLOC_CONF",
                                                            "PENSIEVE_API_KEY")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)
    assert "refusing to bind" in done.stderr + done.stdout
    assert "ALLOC=expandable_segments:True" in done.stdout
