"""backends/cpu_memory: which mappings ``drop_library_pages`` may drop, and that a process
whose library pages were dropped keeps running torch (the pages fault back from the files)."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from pensieve.backends.cpu_memory import clean_library_mappings

SMAPS = """\
7f0000000000-7f0000100000 r-xp 00000000 08:01 123 /usr/lib/libfoo.so.1
Size:               1024 kB
Rss:                 400 kB
Anonymous:             0 kB
7f0000100000-7f0000110000 r--p 00100000 08:01 123 /usr/lib/libfoo.so.1
Size:                 64 kB
Rss:                  64 kB
Anonymous:            64 kB
7f0000110000-7f0000120000 rw-p 00110000 08:01 123 /usr/lib/libfoo.so.1
Size:                 64 kB
Rss:                  64 kB
Anonymous:             8 kB
7f0000200000-7f0000300000 r--p 00000000 08:01 456 /data/model.pack
Size:               1024 kB
Rss:                1024 kB
Anonymous:             0 kB
7f0000300000-7f0000400000 r--s 00000000 08:01 789 /usr/lib/libshared.so
Size:               1024 kB
Rss:                  40 kB
Anonymous:             0 kB
7f0000400000-7f0000500000 r--p 00000000 00:00 0
Size:               1024 kB
Rss:                 100 kB
Anonymous:           100 kB
7f0000500000-7f0000600000 r-xp 00000000 08:01 999 /site-packages/torch/lib/libtorch_cpu.so
Size:               1024 kB
Rss:                   0 kB
Anonymous:             0 kB
7f0000600000-7f0000700000 r-xp 00000000 08:01 998 /lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so
Size:               1024 kB
Rss:                  12 kB
Anonymous:             0 kB
"""


def test_only_clean_private_read_only_library_pages_are_dropped():
    # the text of libfoo and _ssl: not its relocated (copied) read-only part, not its data,
    # not the weights' file, not a shared mapping, not anonymous memory, not a mapping with
    # nothing resident
    assert clean_library_mappings(SMAPS) == [
        (0x7f0000000000, 0x7f0000100000, 400),
        (0x7f0000600000, 0x7f0000700000, 12),
    ]


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc and /proc only")
def test_torch_runs_on_after_its_library_pages_are_dropped():
    code = textwrap.dedent("""
        import re, torch
        from pathlib import Path
        from pensieve.backends.cpu_memory import drop_library_pages

        def file_kb():
            return int(re.search(r"RssFile:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1))

        a = torch.randn(64, 64)
        expected = (a @ a).sum().item()
        before = file_kb()
        dropped = drop_library_pages()
        after = file_kb()
        assert dropped > 10_000, dropped  # torch's libraries: tens of MB
        assert after < before - 10_000, (before, after)
        assert (a @ a).sum().item() == expected  # the code faults back in from the files
        assert torch.nn.functional.softmax(torch.arange(4.0), 0).argmax().item() == 3
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")

