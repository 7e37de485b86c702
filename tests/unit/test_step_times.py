"""``PENSIEVE_STEP_TIMES``: each served engine step a CSV line (start, wall, tokens, running,
chained), closed with the loop; ``bench/step_times.py`` reads it back per decode width."""

from __future__ import annotations

import asyncio
import csv

from bench.step_times import summarise
from pensieve.engine.client import EngineClient
from pensieve.engine.step_times import ENV
from pensieve.engine.types import SamplingParams
from tests.helpers.tiny_engine import ByteTokenizer, tiny_engine


async def _generate(client: EngineClient, rid: str, prompt: str, n: int) -> int:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    got = 0
    async for d in client.generate(ByteTokenizer().encode(prompt), params, rid):
        got += len(d.token_ids)
    return got


async def test_every_step_is_a_line_and_the_summary_reads_them(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, str(tmp_path / "steps"))
    client = EngineClient(tiny_engine(), "tiny")
    client.start()
    try:
        assert await _generate(client, "a", "one stream", 20) == 20
        assert await asyncio.gather(_generate(client, "b", "two", 12),
                                    _generate(client, "c", "three", 12)) == [12, 12]
    finally:
        client.shutdown()
    files = list((tmp_path / "steps").glob("steps-*.csv"))
    assert len(files) == 1
    rows = list(csv.DictReader(files[0].open()))
    assert len(rows) >= 20 + 12
    assert all(float(r["took_ms"]) > 0 and int(r["tokens"]) >= 1 for r in rows)
    starts = [float(r["start_s"]) for r in rows]
    assert starts == sorted(starts)
    singles = [r for r in rows if r["tokens"] == r["running"] == "1"]
    assert len(singles) >= 18  # the first stream's decode steps, one row each
    assert {r["chained"] for r in rows} <= {"0", "1"}  # on the CPU: never chained by default
    lines = summarise(files[0])
    assert lines[0].endswith(f"{len(rows)} steps")
    assert any(line.strip().startswith("decode x1:") for line in lines)


async def test_the_file_holds_every_step_once_the_loop_goes_idle(tmp_path, monkeypatch):
    """A bench kills its server after the last request: the steps must be on disk by then, not
    in the file's buffer (256 lines of it) until the loop closes it."""
    monkeypatch.setenv(ENV, str(tmp_path / "steps"))
    client = EngineClient(tiny_engine(), "tiny")
    client.start()
    try:
        assert await _generate(client, "a", "short", 5) == 5
        files, rows = [], []
        for _ in range(40):  # the loop flushes when it finds no work (it then waits 0.5 s)
            await asyncio.sleep(0.05)
            files = list((tmp_path / "steps").glob("steps-*.csv"))
            rows = list(csv.DictReader(files[0].open())) if files else []
            if len(rows) >= 5:
                break
        assert len(rows) >= 5 and sum(int(r["tokens"]) for r in rows) >= 5
    finally:
        client.shutdown()
