"""bench/gpu_hybrid_table.py's speed-ups and bench/cc_ttft.py's cold request."""

from __future__ import annotations

import json

from bench.cc_ttft import first_request
from bench.gpu_hybrid_table import table
from pensieve.chat.messages import BILLING_HEADER_PREFIX


def _write(folder, rows):  # noqa: ANN001
    folder.mkdir()
    metrics = [{"name": n, "unit": u, "median": v} for n, u, v in rows]
    (folder / "gpu_bench.json").write_text(json.dumps({"info": {}, "metrics": metrics}))


def test_speedups_are_ours_over_theirs_for_rates_and_theirs_over_ours_for_times(tmp_path):
    _write(tmp_path / "p_gpt-oss", [("decode", "tok/s", 220.0),
                                    ("Claude Code turn 1 (cold): TTFT", "ms", 2000.0)])
    _write(tmp_path / "l_gpt-oss", [("decode", "tok/s", 200.0),
                                    ("Claude Code turn 1 (cold): TTFT", "ms", 3000.0)])
    out = table(tmp_path, "gpt-oss")
    assert "| decode | tok/s | 220 | 200 | — | 1.10× |  |" in out
    assert "| Claude Code turn 1 (cold): TTFT | ms | 2000 | 3000 | — | 1.50× |  |" in out
    assert "no results" in table(tmp_path, "qwen35moe")


def test_cold_request_differs_after_the_billing_header_and_keeps_the_tools_asked():
    a, b = first_request("aaa"), first_request("bbb", tools=2)
    assert a["system"][0]["text"].startswith(BILLING_HEADER_PREFIX)
    assert a["system"][1]["text"] != b["system"][1]["text"]
    assert a["system"][2:] == b["system"][2:]
    assert len(a["tools"]) == 24 and len(b["tools"]) == 2
    assert a["max_tokens"] == 1 and "context_management" not in a
