"""A small REST client of the control plane, used by the `cdsp` client verbs and the demo.

Server and token from `ClientSettings` (`CDSP_URL`, `CDSP_TOKEN`, else the token file of a local
service under `CDSP_DATA_DIR`, default ./cdsp-data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

# Reading a streamed answer (logs -f, a download): the server sends at least a keep-alive every
# `log_keepalive` seconds (15 by default), so a minute of silence means the link is gone.
STREAM_TIMEOUT = httpx.Timeout(30.0, read=60.0)


class ClientError(Exception):
    """A problem on this side, before or after talking to the service: settings, an id, a download cut off."""


class ApiError(Exception):
    """A non-2xx answer, with the server's explanation."""

    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {format_detail(detail)}")


def format_detail(detail: Any) -> str:
    """One line per 422 error (`field: message`), else the detail as is."""
    if isinstance(detail, list):
        return "; ".join(f"{e.get('field') or '.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in detail)
    return str(detail)


class ClientSettings(BaseSettings):
    """Where the client finds the service, from the environment (`CDSP_URL`, `CDSP_TOKEN`, `CDSP_DATA_DIR`),
    read like the server's `Settings`."""

    model_config = SettingsConfigDict(env_prefix="CDSP_", extra="ignore", use_attribute_docstrings=True)

    url: str = "http://127.0.0.1:8000"
    """The control plane's base URL."""
    token: str | None = None
    """The API token; unset = the token file a local service wrote under `data_dir`."""
    data_dir: Path = Path("cdsp-data")
    """The local service's folder (its `api-token` file)."""

    def api_token(self) -> str | None:
        if self.token:
            return check_token(self.token, "CDSP_TOKEN")
        path = self.data_dir / "api-token"
        return check_token(path.read_text(), f"the token file {path}") if path.is_file() else None


def check_token(token: str, source: str) -> str:
    """The token without surrounding white space; one that cannot go in an HTTP header is refused,
    naming where it came from but never showing it."""
    token = token.strip()
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ClientError(f"{source}: the token must be printable ASCII without spaces")
    return token


def check_url(url: str) -> str:
    """The service's base URL without a trailing slash; refused, naming CDSP_URL, unless http(s)."""
    try:
        parsed = httpx.URL(url)
        parsed.port  # noqa: B018 (parses the port)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ClientError(f"CDSP_URL {url!r} is not a usable URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ClientError(f"CDSP_URL {url!r} must be an http:// or https:// URL with a host")
    return url.rstrip("/")


def experiment_path(experiment_id: str, *rest: str) -> str:
    """`/v1/experiments/{id}/...` with the id quoted: an id holding `/`, `?` or `..` names nothing else."""
    if experiment_id.strip() in ("", ".", ".."):
        raise ClientError(f"{experiment_id!r} is not an experiment id (like exp-3f2a9c1b7d4e)")
    return "/".join(["/v1/experiments", quote(experiment_id, safe=""), *rest])


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        settings = ClientSettings()
        self.url = check_url(url or settings.url)
        token = check_token(token, "the token") if token else settings.api_token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        if r.status_code >= 400:
            raise ApiError(r.status_code, _detail(r))
        try:
            return r.json()
        except ValueError:
            raise ClientError(
                f"{method} {self.url}{path} answered HTTP {r.status_code} with something other than JSON "
                f"({r.text[:120]!r}); is CDSP_URL the control plane?"
            ) from None

    def submit(self, spec: dict[str, Any], priority: int = 0, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"spec": spec, "priority": priority}
        return dict(self._json("POST", "/v1/experiments", json=body, headers=headers))

    def list(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return dict(self._json("GET", "/v1/experiments", params=params))

    def get(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("GET", experiment_path(experiment_id)))

    def cancel(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("POST", experiment_path(experiment_id, "cancel")))

    def retry(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("POST", experiment_path(experiment_id, "retry")))

    def trials(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("GET", experiment_path(experiment_id, "trials")))

    def checkpoints(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("GET", experiment_path(experiment_id, "checkpoints")))

    def logs(self, experiment_id: str, tail: int = 200) -> str:
        r = self.http.get(experiment_path(experiment_id, "logs"), params={"tail": tail})
        if r.status_code >= 400:
            raise ApiError(r.status_code, _detail(r))
        return r.text

    def follow_logs(self, experiment_id: str, tail: int = 200) -> Iterator[str]:
        params: dict[str, Any] = {"tail": tail, "follow": "true"}
        path = experiment_path(experiment_id, "logs")
        with self.http.stream("GET", path, params=params, timeout=STREAM_TIMEOUT) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiError(r.status_code, _detail(r))
            for text in r.iter_text():
                if text := text.replace("\0", ""):  # the server's keep-alives
                    yield text

    def download_checkpoint(self, experiment_id: str, name: str, dest: Path) -> tuple[Path, str]:
        """Stream a checkpoint to `dest` (atomically) and check it against the server's SHA-256."""
        path = experiment_path(experiment_id, "checkpoints", quote(name, safe=""))
        tmp = dest.with_name(f".{dest.name}.part")
        digest = hashlib.sha256()
        response: httpx.Response | None = None
        try:
            with self.http.stream("GET", path, timeout=STREAM_TIMEOUT) as r:
                response = r
                if r.status_code >= 400:
                    r.read()
                    raise ApiError(r.status_code, _detail(r))
                expected = r.headers.get("X-Checksum-SHA256", "")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with tmp.open("wb") as f:
                    for block in r.iter_bytes(1 << 20):
                        digest.update(block)
                        f.write(block)
        except httpx.HTTPError as exc:
            tmp.unlink(missing_ok=True)
            received = response.num_bytes_downloaded if response is not None else 0
            if response is None and isinstance(exc, httpx.ConnectError):
                raise  # never reached the service: said as such by the caller
            raise ClientError(
                f"the download of {name} broke off after {received} bytes ({type(exc).__name__}); "
                f"nothing was written to {dest}: run the fetch again"
            ) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise ApiError(502, f"checksum mismatch for {name}: got {digest.hexdigest()}, server said {expected}")
        tmp.replace(dest)
        return dest, expected


def _detail(r: httpx.Response) -> Any:
    try:
        body = r.json()
    except ValueError:
        return r.text[:2000]
    return body.get("detail", body) if isinstance(body, dict) else body
