"""The Ray Jobs API, as the dispatcher and reconciler use it.

A thin wrapper over `ray.job_submission.JobSubmissionClient` that (1) sends the cluster's bearer
token (Ray token auth: `Authorization: Bearer <token>`), (2) bounds every request with a timeout
(the SDK's requests have none, and a hung dashboard must not hang the dispatcher), and (3) turns
the SDK's errors into the four exceptions below, which the callers act on. Logs are read with
`get_job_logs` (the follow endpoint polls it: that also works once the job has ended).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import httpx


class RayUnavailable(Exception):
    """The Ray dashboard cannot be reached or refuses our token: try again later."""


class JobNotFound(LookupError):
    """The cluster has no job with that submission id."""


class JobExists(Exception):
    """A job with that submission id was already submitted (by us, before a crash)."""


class RayError(Exception):
    """Ray answered but refused the request (a bad entrypoint or runtime env, a server error)."""


@dataclass(frozen=True)
class JobInfo:
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str
    start_time: float | None  # unix seconds
    end_time: float | None
    exit_code: int | None


def _make_client(address: str, headers: dict[str, str], timeout: float) -> Any:
    from ray.job_submission import JobSubmissionClient

    class _Client(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", timeout)
            return super()._do_request(method, endpoint, **kwargs)

    return _Client(address=address, headers=headers)


class RayJobs:
    """Submit, follow, stop and read the logs of Ray jobs on one cluster."""

    def __init__(self, address: str, token: str | None, timeout: float = 10.0, dashboard_url: str | None = None):
        self.timeout = timeout
        self._public_dashboard = dashboard_url
        self._client: Any = None
        self._lock = threading.Lock()
        self._http: httpx.Client | None = None
        self.rebind(address, token)

    def rebind(self, address: str, token: str | None) -> None:
        """Point at another cluster (the embedded head restarted on new ports, with a new token)."""
        with self._lock:
            self.address = address.rstrip("/")
            self.dashboard = (self._public_dashboard or self.address).rstrip("/")
            self.headers = {"Authorization": f"Bearer {token}"} if token else {}
            self._client = None
            old, self._http = self._http, httpx.Client(headers=self.headers)
            # One connection pool for the health pings: a new httpx client per call builds an SSL
            # context (~20 ms of CPU under the GIL), which showed up as API tail latency.
        if old is not None:
            old.close()

    def close(self) -> None:
        """Release the ping client's connections (the SDK client keeps none open)."""
        if self._http is not None:
            self._http.close()

    # ---- connection --------------------------------------------------------------------
    def ping(self, timeout: float = 3.0) -> str | None:
        """None when the dashboard answers with our token, else why not."""
        http = self._http
        assert http is not None
        try:
            r = http.get(f"{self.address}/api/version", timeout=timeout)
        except httpx.HTTPError as exc:
            return f"Ray dashboard {self.address} unreachable: {type(exc).__name__}: {exc}"
        if r.status_code in (401, 403):
            return f"Ray dashboard {self.address} refused the token (HTTP {r.status_code}); set CDSP_RAY_TOKEN"
        if r.status_code != 200:
            return f"Ray dashboard {self.address} answered HTTP {r.status_code}"
        return None

    def _get(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    self._client = _make_client(self.address, self.headers, self.timeout)
                except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError...
                    raise RayUnavailable(f"cannot connect to Ray at {self.address}: {exc}") from exc
            return self._client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import requests

        client = self._get()
        try:
            return getattr(client, method)(*args, **kwargs)
        except requests.exceptions.RequestException as exc:
            with self._lock:
                self._client = None  # reconnect (and re-check the version) next time
            raise RayUnavailable(f"Ray at {self.address}: {type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:  # the SDK's "Request failed with status code N: <body>"
            text = str(exc)
            if "status code 404" in text or "does not exist" in text:
                raise JobNotFound(f"Ray has no job {args[0] if args else ''}".strip()) from exc
            if "already exists" in text:
                raise JobExists("Ray already has a job with this submission id") from exc
            raise RayError(" ".join(text.split())[:500]) from exc
        except Exception as exc:
            if type(exc).__name__ == "AuthenticationError":
                raise RayUnavailable(f"Ray at {self.address} refused the token: {exc}") from exc
            raise

    # ---- jobs --------------------------------------------------------------------------
    def submit(self, entrypoint: str, submission_id: str, metadata: dict[str, str]) -> None:
        self._call("submit_job", entrypoint=entrypoint, submission_id=submission_id, metadata=metadata)

    def info(self, submission_id: str) -> JobInfo:
        d = self._call("get_job_info", submission_id)
        return JobInfo(
            status=str(d.status),
            message=d.message or "",
            start_time=d.start_time / 1000 if d.start_time else None,
            end_time=d.end_time / 1000 if d.end_time else None,
            exit_code=getattr(d, "driver_exit_code", None),
        )

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop a job (SIGTERM, then SIGKILL after Ray's timeout); False if not running."""
        return bool(self._call("stop_job", submission_id))

    def logs(self, submission_id: str) -> str:
        return str(self._call("get_job_logs", submission_id))

    def job_url(self, submission_id: str) -> str:
        return f"{self.dashboard}/#/jobs/{submission_id}"
