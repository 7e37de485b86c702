"""The model pool's names, memory budget and unloading (``api/model_pool.py``), with engine
clients that report their counters like the real one; and the TOML config's checks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pensieve.api.config import ApiConfig
from pensieve.api.errors import ApiError
from pensieve.api.model_pool import LoadedModel, ModelPool, PoolEntry
from pensieve.api.state import Services
from pensieve.cli.config_file import load_config_file, parse_config
from pensieve.engine.client import EngineSnapshot

GIB = 2**30


@dataclass
class FakeClient:
    running: int = 0
    stopped: bool = False

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(running=self.running, waiting=0, queued=0, kv_blocks_total=8,
                              kv_blocks_free=8, kv_blocks_cached=0)

    def shutdown(self) -> None:
        self.stopped = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_pool(budget_gib: float | None = 10, idle: float | None = None, fail: set[str] = frozenset()):
    clock = Clock()
    clients: dict[str, FakeClient] = {}
    loads: list[str] = []

    def load(model_id: str) -> LoadedModel:
        loads.append(model_id)
        if model_id in fail:
            raise FileNotFoundError(f"{model_id}.gguf: no such file")
        clients[model_id] = FakeClient()
        config = ApiConfig(model_id=model_id, context_length=64)
        return LoadedModel(Services(config, clients[model_id], None), clients[model_id])  # type: ignore[arg-type]

    entries = [PoolEntry("main", ("m",), 4 * GIB), PoolEntry("small", (), 3 * GIB),
               PoolEntry("other", (), 5 * GIB), PoolEntry("huge", (), 20 * GIB)]
    routes = [("claude-haiku-*", "small"), ("claude-*", "main")]
    pool = ModelPool(entries, routes, load, budget_bytes=None if budget_gib is None else int(budget_gib * GIB),
                     idle_unload_s=idle, clock=clock, pinned=frozenset({"main"}))
    return pool, clock, clients, loads


def test_names_resolve_by_id_alias_then_routes_in_order():
    pool, *_ = make_pool()
    assert pool.resolve("main") == pool.resolve("m") == "main"
    assert pool.resolve("claude-haiku-4-5") == "small"
    assert pool.resolve("claude-opus-4-8") == "main"
    assert pool.resolve("gpt-4") is None
    assert pool.listed_ids()[:2] == [("claude-haiku-small", "small"), ("claude-main", "main")]


async def test_loads_on_first_use_once():
    pool, clock, clients, loads = make_pool()
    services = await pool.acquire("claude-haiku-4-5")
    assert services.config.model_id == "small" and loads == ["small"]
    await pool.acquire("small")
    assert loads == ["small"]
    with pytest.raises(ApiError) as info:
        await pool.acquire("gpt-4")
    assert info.value.status == 404 and "small" in info.value.message


async def test_least_recently_used_idle_model_makes_room():
    pool, clock, clients, loads = make_pool(budget_gib=10)
    await pool.acquire("main")  # 4
    clock.now += 10
    await pool.acquire("small")  # 3 → 7 of 10
    clock.now += 10
    await pool.acquire("other")  # 5: 12 > 10 → small (LRU, idle, not pinned) goes
    assert set(pool.loaded) == {"main", "other"} and clients["small"].stopped
    clock.now += 10
    clients["other"].running = 1  # busy: cannot make room for small now
    await pool.acquire("main")
    with pytest.raises(ApiError) as info:
        await pool.acquire("small")
    assert info.value.status == 529 and "retry-after" in info.value.headers
    clients["other"].running = 0
    clock.now += 10
    await pool.acquire("small")
    assert set(pool.loaded) == {"main", "small"} and clients["other"].stopped
    with pytest.raises(ApiError) as info:
        await pool.acquire("huge")
    assert info.value.status == 400 and "memory budget" in info.value.message


async def test_idle_models_unload_but_not_the_pinned_one():
    pool, clock, clients, _ = make_pool(idle=60)
    await pool.acquire("main")
    await pool.acquire("small")
    clock.now += 30
    assert await pool.unload_idle() == []
    clock.now += 31
    assert await pool.unload_idle() == ["small"]
    assert list(pool.loaded) == ["main"] and not clients["main"].stopped
    assert {m["id"]: m["loaded"] for m in pool.status()} == {"main": True, "small": False, "other": False,
                                                            "huge": False}
    pool.shutdown()


async def test_a_failed_load_is_named_and_not_retried_at_once():
    pool, clock, _, loads = make_pool(fail={"other"})
    for _ in range(2):
        with pytest.raises(ApiError) as info:
            await pool.acquire("other")
        assert info.value.status == 500 and "other could not be loaded" in info.value.message
    assert loads == ["other"]
    clock.now += 60
    with pytest.raises(ApiError):
        await pool.acquire("other")
    assert loads == ["other", "other"]


def test_config_file_checks_name_the_key(tmp_path):
    ok = parse_config({"models": [{"name": "a", "model": "a.gguf"}, {"model": "/x/b.gguf", "aliases": ["bb"]}],
                       "routes": {"claude-haiku-*": "bb"}, "idle_unload_s": 0})
    assert [m.name for m in ok.models] == ["a", "b"] and ok.models[0].preload and not ok.models[1].preload
    assert ok.routes == (("claude-haiku-*", "b"),) and ok.idle_unload_s is None
    bad = [
        ({"models": []}, "at least one"),
        ({"models": [{"name": "a"}]}, "models[0].model"),
        ({"models": [{"model": "a.gguf", "colour": 1}]}, "unknown keys ['colour']"),
        ({"models": [{"model": "a.gguf"}], "routes": {"claude-*": "nope"}}, "'nope'"),
        ({"models": [{"model": "a.gguf"}, {"name": "a", "model": "b.gguf"}]}, "used twice"),
        ({"models": [{"model": "a.gguf", "weights": "int3"}]}, "weights"),
        ({"models": [{"model": "a.gguf", "context_length": 4}]}, "context_length"),
    ]
    for raw, words in bad:
        with pytest.raises(ValueError) as info:
            parse_config(raw)
        assert words in str(info.value), (raw, str(info.value))
    path = tmp_path / "m.toml"
    path.write_text("models = [")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config_file(path)
    with pytest.raises(ValueError, match="no such file"):
        load_config_file(tmp_path / "missing.toml")
