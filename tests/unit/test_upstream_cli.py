"""``--backend upstream`` flags and ``--upstream-config`` TOML → UpstreamConfig."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pensieve.cli.serve import add_parser
from pensieve.cli.serve_upstream import upstream_config


def _ns(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_flags_build_the_config() -> None:
    ns = _ns("--backend", "upstream", "--upstream", "http://a:8000", "--upstream", "http://b:8000",
             "--upstream-routing-header", "X-Session-ID", "--upstream-routing-header", "X-SMG-Routing-Key")
    config = upstream_config(ns)
    assert ns.backend == "upstream"
    assert config.urls == ("http://a:8000", "http://b:8000") and config.dialect == "vllm"
    assert config.routing_headers == ("X-Session-ID", "X-SMG-Routing-Key") and config.model is None


def test_file_values_and_flags_over_them(tmp_path: Path) -> None:
    file = tmp_path / "upstream.toml"
    file.write_text('urls = ["http://router:8080"]\ndialect = "sglang"\nmodel = "m"\n'
                    'health_interval_s = 2\napi_key = "secret"\n')
    config = upstream_config(_ns("--upstream-config", str(file)))
    assert (config.urls, config.dialect, config.model, config.health_interval_s, config.api_key) == \
        (("http://router:8080",), "sglang", "m", 2, "secret")
    config = upstream_config(_ns("--upstream-config", str(file), "--upstream", "http://x:1",
                                 "--upstream-dialect", "vllm"))
    assert config.urls == ("http://x:1",) and config.dialect == "vllm" and config.model == "m"


@pytest.mark.parametrize(("content", "argv", "message"), [
    (None, (), "needs --upstream"),
    (None, ("--upstream", "router:8080"), "http"),
    ('urls = ["http://a"]\nbogus = 1\n', (), "unknown keys bogus"),
    ('urls = ["http://a"]\ndialect = "tgi"\n', (), "dialect must be one of"),
    ("urls = [", (), "upstream-config"),
])
def test_bad_configs_say_what_is_wrong(tmp_path: Path, content: str | None, argv: tuple[str, ...],
                                       message: str) -> None:
    extra: tuple[str, ...] = ()
    if content is not None:
        file = tmp_path / "u.toml"
        file.write_text(content)
        extra = ("--upstream-config", str(file))
    with pytest.raises(ValueError, match=message):
        upstream_config(_ns("--backend", "upstream", *extra, *argv))
