"""Where the client looks for the service: CDSP_URL, CDSP_TOKEN, else a local service's token file."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from service import client as client_module
from service.cli import app
from service.client import Client, ClientError, ClientSettings, experiment_path


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


class _Faulty(BaseHTTPRequestHandler):
    """A server that misbehaves on purpose: a download cut off after 1 MB of 3, a log stream that goes
    silent, and a plain-text page where JSON belongs."""

    def do_GET(self) -> None:
        if self.path.endswith("/checkpoints/final.pt"):
            self.send_response(200)
            self.send_header("Content-Length", str(3_000_000))
            self.send_header("X-Checksum-SHA256", "0" * 64)
            self.end_headers()
            self.wfile.write(b"w" * 1_000_000)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the link drops mid-body
        elif "/logs" in self.path:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"first line\n")
            self.wfile.flush()
            time.sleep(5)  # then nothing: no keep-alive either
        else:
            body = b"<html>a web page, not the API</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def faulty() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(60)
def test_a_download_cut_off_leaves_no_file_and_says_so(faulty: str, tmp_path: Path) -> None:
    dest = tmp_path / "fetched" / "final.pt"
    with Client(faulty, "token") as client, pytest.raises(ClientError, match="broke off after 1000000 bytes"):
        client.download_checkpoint("exp-1", "final.pt", dest)
    assert list(dest.parent.iterdir()) == []  # neither the file nor its .part


@pytest.mark.timeout(60)
def test_a_silent_log_stream_and_a_page_that_is_not_the_api_end_in_one_line(
    faulty: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "STREAM_TIMEOUT", httpx.Timeout(5.0, read=1.0))  # 60 s in use
    env = {"CDSP_URL": faulty, "CDSP_TOKEN": "token"}
    silent = CliRunner().invoke(app, ["logs", "-f", "exp-1"], env=env)
    assert silent.exit_code == 1 and "first line" in silent.output
    assert f"{faulty}/v1/experiments/exp-1/logs did not answer in time" in silent.output
    page = CliRunner().invoke(app, ["status", "exp-1"], env=env)
    assert page.exit_code == 1 and "with something other than JSON" in page.output and "CDSP_URL" in page.output


def test_ids_are_quoted_and_bad_settings_are_named_without_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    assert experiment_path("a?b=1") == "/v1/experiments/a%3Fb%3D1"
    assert experiment_path("exp-1/../exp-2", "cancel") == "/v1/experiments/exp-1%2F..%2Fexp-2/cancel"
    for bad in ("", "..", " "):
        with pytest.raises(ClientError, match="is not an experiment id"):
            experiment_path(bad)
    with pytest.raises(ClientError, match=r"CDSP_URL 'http://localhost:80oo' is not a usable URL"):
        Client("http://localhost:80oo", "t")
    with pytest.raises(ClientError, match="must be an http"):
        Client("localhost:8000", "t")
    monkeypatch.setenv("CDSP_TOKEN", "sécret")
    with pytest.raises(ClientError, match="CDSP_TOKEN: the token must be printable ASCII") as info:
        Client("http://127.0.0.1:9")
    assert "sécret" not in str(info.value)
    monkeypatch.setenv("CDSP_TOKEN", "secret\n")  # a trailing newline from `echo` is dropped
    with Client("http://127.0.0.1:9") as client:
        assert client.http.headers["Authorization"] == "Bearer secret"
