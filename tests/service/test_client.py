"""Where the client looks for the service: CDSP_URL, CDSP_TOKEN, else a local service's token file."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.client import Client, ClientSettings


def test_defaults_then_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CDSP_URL", "CDSP_TOKEN", "CDSP_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert ClientSettings().url == "http://127.0.0.1:8000" and ClientSettings().api_token() is None

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "api-token").write_text("from-file\n")
    monkeypatch.setenv("CDSP_DATA_DIR", str(tmp_path / "state"))
    assert ClientSettings().api_token() == "from-file"
    monkeypatch.setenv("CDSP_TOKEN", "from-env")  # wins over the file
    monkeypatch.setenv("CDSP_URL", "http://svc:9000/")
    with Client() as client:
        assert client.url == "http://svc:9000"
        assert client.http.headers["Authorization"] == "Bearer from-env"
    with Client(url="http://other:1", token="given") as client:  # arguments win over the environment
        assert client.url == "http://other:1" and client.http.headers["Authorization"] == "Bearer given"
