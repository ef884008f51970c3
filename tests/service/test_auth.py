"""Bearer-token auth on every route but /healthz (issue item 8)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from service.auth import token_matches
from service.main import create_app
from service.settings import Settings
from tests.service.conftest import TOKEN

PUBLIC = {"/healthz"}


def _concrete(path: str) -> str:
    """Fill path parameters with plausible values (`exp-000000000000`, `x.pt`)."""
    return re.sub(r"\{name\}", "x.pt", re.sub(r"\{experiment_id\}", "exp-000000000000", path))


def test_every_route_but_healthz_needs_a_token(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings())
    checked = []
    with TestClient(app) as client:
        # iter_route_contexts flattens included routers (FastAPI keeps them nested in app.routes)
        for route in iter_route_contexts(app.routes):
            assert route.path, f"a route without a path: {route}"
            for method in sorted(route.methods or ()):
                if method == "HEAD":
                    continue
                path = _concrete(route.path)
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
                    r = client.request(method, path, headers=headers)
                    if route.path in PUBLIC or (method, route.path) == ("GET", "/ui/login"):  # the way in
                        assert r.status_code == 200, path
                    else:
                        assert r.status_code == 401, f"{method} {path} answered {r.status_code} with {headers}"
                        assert r.headers["www-authenticate"] == "Bearer"
                checked.append(f"{method} {route.path}")
        ok = client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200
    # the walk saw the API, the docs and the ops routes, not just a few
    assert {"POST /v1/experiments", "GET /docs", "GET /openapi.json", "GET /metrics", "GET /readyz"} <= set(checked)
    assert len(checked) >= 17
    ui = {c for c in checked if " /ui/" in c}  # the web page's routes are walked too
    assert {"GET /ui/", "GET /ui/experiments/{experiment_id}", "POST /ui/experiments/{experiment_id}/cancel",
            "GET /ui/compare", "POST /ui/login"} <= ui  # fmt: skip


def test_token_comparison() -> None:
    assert token_matches("b", ["a", "b"])
    assert not token_matches("", ["a"])
    assert not token_matches("a" * 5, ["a" * 4])
    assert not token_matches("x", [])


def test_a_token_is_generated_once_when_none_is_configured(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, api_tokens=[])
    first = settings.resolved_tokens()
    assert len(first) == 1 and len(first[0]) >= 32
    assert Settings(data_dir=tmp_path).resolved_tokens() == first
    assert (tmp_path / "api-token").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("raw, expected", [("a,b", ["a", "b"]), (" a , ,b ", ["a", "b"]), ("", [])])
def test_api_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch, raw: str, expected: list[str]) -> None:
    monkeypatch.setenv("CDSP_API_TOKENS", raw)
    assert Settings().api_tokens == expected


@pytest.mark.parametrize(
    ("env", "value", "words"),
    [
        ("CDSP_REPLICA_ID", "r" * 200, "CDSP_REPLICA_ID: String should have at most 128 characters"),
        ("CDSP_STORAGE", "/" + "s" * 1000, "CDSP_STORAGE: String should have at most 900 characters"),
    ],
)
def test_cdsp_serve_names_a_bad_setting_in_one_line(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, words: str
) -> None:
    """Settings that would not fit their database columns (PostgreSQL enforces the sizes, SQLite does
    not) are refused at start, by their variable's name, instead of a uvicorn factory traceback."""
    from typer.testing import CliRunner

    from service.cli import app

    monkeypatch.setenv(env, value)
    result = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())
