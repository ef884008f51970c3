"""The one `Settings` object of the control plane, read from `CDSP_*` environment variables.

Defaults give a working single machine: SQLite and artifacts under `./cdsp-data/`, and an
embedded Ray head owned by the service when `CDSP_RAY_ADDRESS` is unset.
"""

from __future__ import annotations

import os
import secrets
import socket
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cdsp_core import runs

DEFAULT_ENTRYPOINT = "python -m workers.run --spec {spec} --out {out}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CDSP_", extra="ignore", use_attribute_docstrings=True)

    data_dir: Path = Path("cdsp-data")
    """Folder of the embedded defaults: the SQLite file, the artifacts, the API token, the Ray head state."""
    database_url: str | None = None
    """SQLAlchemy URL; unset = `sqlite:///{data_dir}/cdsp.db` (WAL). Production: `postgresql+psycopg://...`."""
    storage: str | None = Field(default=None, max_length=900)
    """Root of the run folders: a local path or an fsspec URI (`s3://bucket/prefix`); unset = `{data_dir}/artifacts`.
    At most 900 characters: a run folder's path is stored in a 1024-character column."""
    ray_address: str | None = None
    """Ray dashboard URL (`http://head:8265`); unset = start and own a local Ray head."""
    ray_token: str | None = None
    """Bearer token of the Ray cluster (token auth); unset = `RAY_AUTH_TOKEN` from the environment."""
    dashboard_url: str | None = None
    """Public URL of the Ray dashboard shown to users; unset = the Ray address."""
    api_tokens: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Accepted bearer tokens, comma-separated; unset = one generated into `{data_dir}/api-token`."""
    max_running: int = Field(default=2, ge=1)
    """Experiments dispatched to Ray at the same time (dispatching + running), across all replicas."""
    job_entrypoint: str = DEFAULT_ENTRYPOINT
    """Shell command of the Ray job; `{spec}` and `{out}` are replaced by the (quoted) run locations."""
    poll_interval: float = Field(default=1.0, gt=0)
    """Seconds between two passes of the dispatcher and reconciler."""
    dispatch_grace: float = Field(default=30.0, gt=0)
    """Seconds after which a claim that never reached Ray is taken back (its replica died mid-submit)."""
    ray_timeout: float = Field(default=10.0, gt=0)
    """Seconds before a request to the Ray dashboard counts as failed."""
    ray_num_cpus: int | None = None
    """CPUs of the embedded Ray head; unset = all cores."""
    replica_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}"[:128], max_length=128)
    """Name of this replica in claims and transitions (defaults to host and pid; at most 128 characters,
    its column's size on PostgreSQL)."""
    ray_lost_after: float = Field(default=60.0, gt=0)
    """Seconds Ray may stay unreachable before the experiments it was running are failed as lost (their
    logs up to then are kept; `retry` resumes them from the latest checkpoint once a cluster answers)."""
    log_mirror_interval: float = Field(default=10.0, gt=0)
    """Seconds between two copies of a running job's logs into its run folder (they outlive a lost head)."""
    log_keepalive: float = Field(default=15.0, gt=0, le=30)
    """Seconds of silence after which `logs?follow=true` sends a keep-alive (one NUL byte, which clients drop);
    at most 30, half the read timeout of `cdsp logs -f`."""
    dataset_roots: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Where datasets may live, comma-separated local folders or URI prefixes; unset = anywhere. When set, a spec
    whose `data.root` (or absolute `data.pseudo_label_dir`) lies elsewhere is refused with 422."""
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body accepted (a spec is a few kB); larger ones get 413 before they are parsed."""
    background: bool = True
    """Run the dispatcher and reconciler in this process (off for a read-only replica or some tests)."""
    mlflow_tracking_uri: str | None = None
    """An MLflow tracking server (`http://host:5000`): each experiment that ends is mirrored there as a run
    (needs the `cdsp[mlflow]` extra). Unset: no MLflow."""
    mlflow_experiment: str = "cdsp"
    """The MLflow experiment the runs go to."""

    @field_validator("api_tokens", "dataset_roots", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [t.strip() for t in v.split(",") if t.strip()]
        return v

    @field_validator("ray_address", "database_url", "storage", "dashboard_url", "ray_token", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @cached_property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'cdsp.db').resolve()}"

    @cached_property
    def storage_root(self) -> str:
        """The storage root, made absolute when local: jobs run in another working directory."""
        root = self.storage or str(self.data_dir / "artifacts")
        return root if runs.is_remote(root) else str(runs.local_path(root).expanduser().resolve())

    def run_dir(self, experiment_id: str) -> str:
        """`{storage}/experiments/{id}`, the run folder contract shared with the workers."""
        return runs.join(self.storage_root, "experiments", experiment_id)

    def resolved_tokens(self) -> list[str]:
        """The API tokens; with none configured, one is generated once and kept in `{data_dir}/api-token`."""
        if self.api_tokens:
            return self.api_tokens
        path = self.data_dir / "api-token"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two processes starting together keep the same token
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return [path.read_text().strip()]
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
        return [path.read_text().strip()]

    def outside_dataset_roots(self, location: str) -> bool:
        """Whether a dataset location lies outside `dataset_roots` (never, when none are configured)."""
        if not self.dataset_roots:
            return False
        if runs.is_remote(location):
            return not any(
                location.rstrip("/").startswith(r.rstrip("/") + "/") for r in self.dataset_roots if runs.is_remote(r)
            )
        where = Path(location).expanduser().resolve()
        return not any(
            where.is_relative_to(Path(r).expanduser().resolve()) for r in self.dataset_roots if not runs.is_remote(r)
        )
