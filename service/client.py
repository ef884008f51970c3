"""A small REST client of the control plane, used by the `cdsp` client verbs and the demo.

Server and token from `ClientSettings` (`CDSP_URL`, `CDSP_TOKEN`, else the token file of a local
service under `CDSP_DATA_DIR`, default ./cdsp-data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict


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
            return self.token
        path = self.data_dir / "api-token"
        return path.read_text().strip() if path.is_file() else None


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        settings = ClientSettings()
        self.url = (url or settings.url).rstrip("/")
        token = token or settings.api_token()
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
        return r.json()

    def submit(self, spec: dict[str, Any], priority: int = 0, idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"spec": spec, "priority": priority}
        return dict(self._json("POST", "/v1/experiments", json=body, headers=headers))

    def list(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None}
        return dict(self._json("GET", "/v1/experiments", params=params))

    def get(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/experiments/{experiment_id}"))

    def cancel(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/experiments/{experiment_id}/cancel"))

    def retry(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("POST", f"/v1/experiments/{experiment_id}/retry"))

    def trials(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/experiments/{experiment_id}/trials"))

    def checkpoints(self, experiment_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/v1/experiments/{experiment_id}/checkpoints"))

    def logs(self, experiment_id: str, tail: int = 200) -> str:
        r = self.http.get(f"/v1/experiments/{experiment_id}/logs", params={"tail": tail})
        if r.status_code >= 400:
            raise ApiError(r.status_code, _detail(r))
        return r.text

    def follow_logs(self, experiment_id: str, tail: int = 200) -> Iterator[str]:
        params: dict[str, Any] = {"tail": tail, "follow": "true"}
        with self.http.stream("GET", f"/v1/experiments/{experiment_id}/logs", params=params, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiError(r.status_code, _detail(r))
            for text in r.iter_text():
                if text := text.replace("\0", ""):  # the server's keep-alives
                    yield text

    def download_checkpoint(self, experiment_id: str, name: str, dest: Path) -> tuple[Path, str]:
        """Stream a checkpoint to `dest` (atomically) and check it against the server's SHA-256."""
        path = f"/v1/experiments/{experiment_id}/checkpoints/{name}"
        tmp = dest.with_name(f".{dest.name}.part")
        digest = hashlib.sha256()
        with self.http.stream("GET", path, timeout=None) as r:
            if r.status_code >= 400:
                r.read()
                raise ApiError(r.status_code, _detail(r))
            expected = r.headers.get("X-Checksum-SHA256", "")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as f:
                for block in r.iter_bytes(1 << 20):
                    digest.update(block)
                    f.write(block)
        if digest.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            raise ApiError(502, f"checksum mismatch for {name}: got {digest.hexdigest()}, server said {expected}")
        tmp.replace(dest)
        return dest, expected


def _detail(r: httpx.Response) -> Any:
    try:
        return r.json().get("detail", r.text)
    except ValueError:
        return r.text
