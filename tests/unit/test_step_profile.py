"""``PENSIEVE_PROFILE_STEPS`` (``backends/step_profile.py``): a served engine's steps profiled
by kind (decode / batched decode / other) after the skipped ones, written to the named file; tokens unchanged;
a malformed value is refused with the variable's name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pensieve.backends import step_profile
from pensieve.engine.types import SamplingParams
from tests.helpers.tiny_engine import tiny_engine


def _tokens(engine) -> dict[str, list[int]]:  # noqa: ANN001
    for rid, n in (("a", 90), ("b", 9)):
        engine.add_request(rid, list(range(3, 3 + n)),
                           SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for d in engine.step():
            out.setdefault(d.request_id, []).extend(d.token_ids)
    return out


def test_profiled_steps_are_written_by_kind_and_change_no_token(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    want = _tokens(tiny_engine(max_num_batched_tokens=16))
    path = tmp_path / "profile.txt"
    monkeypatch.setenv(step_profile.ENV, f"3:{path}")
    monkeypatch.setenv("PENSIEVE_PROFILE_SKIP", "1")
    engine = tiny_engine(max_num_batched_tokens=16)
    assert engine.runner.profiler is not None
    assert _tokens(engine) == want
    text = path.read_text()
    assert text.count("## decode steps: 3 profiled after 1") == 1
    assert text.count("## other steps: 3 profiled after 1") == 1  # 99 prompt tokens, 16 a step
    # both requests decoding: their steps are their own kind, not mixed into one-row decode's
    assert text.count("## batched decode steps: 3 profiled after 1 (last one 2 chunks)") == 1
    assert "## decode steps: 3 profiled after 1 (last one 1 chunks)" in text
    assert "wall per step (synchronised)" in text and "aten::" in text
    kinds = engine.runner.profiler.kinds
    assert kinds["decode"].done and kinds["other"].done and kinds["decode"].seen > 4


def test_off_unless_asked_and_a_bad_value_is_refused() -> None:
    cpu = torch.device("cpu")
    assert step_profile.from_env(cpu, {}) is None
    made = step_profile.from_env(cpu, {step_profile.ENV: "4"})
    assert made is not None and made.count == 4 and made.path.name == "pensieve-profile.txt"
    for bad in ("0", "x", "-2:/tmp/p"):
        with pytest.raises(ValueError, match=step_profile.ENV):
            step_profile.from_env(cpu, {step_profile.ENV: bad})
