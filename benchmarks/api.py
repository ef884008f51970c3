"""The control plane under load on loopback: submits and status polls at a fixed rate, SQLite and PostgreSQL.

    .venv/bin/python benchmarks/api.py [--rate 200] [--seconds 20] [--backends sqlite postgres]
                                       [--submit-fraction 0.1] [--list-fraction 0.05]

The service runs as deployed, in its own process (`uvicorn service.main:create_app --factory`, one
worker, real HTTP on 127.0.0.1), with its background loop on and a Ray address nothing listens on:
experiments stay queued, and the dispatcher's passes (woken by every submit) are part of the load.
Submits carry configs/synthetic-demo.yaml with `data.root` on a tiny synthetic dataset, so the
service's dataset layout check runs on every POST. Polls read a random experiment already submitted.

Open loop: request i is due at `start + i / rate` whatever happened to the earlier ones, and its
latency runs from that due time, so a server (or load generator) that falls behind shows as
queueing delay instead of a lower request rate. Any non-2xx answer or transport error is an error.
The load generator (async httpx, one event loop) shares the machine's cores with the server.
PostgreSQL: database `test` on 127.0.0.1:5432 (user postgres or root, trust auth), in a fresh
schema dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import yaml
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, table, write_results
from cdsp_core.data.synthetic import generate
from cdsp_core.ray_head import free_port

TOKEN = "bench-token-" + secrets.token_hex(16)
UNREACHABLE_RAY = "http://127.0.0.1:9"  # discard port: nothing listens there
TARGET_P99_MS, TARGET_RATE = 50.0, 200.0
SEED_EXPERIMENTS = 20  # submitted before the timed window, so that polls have ids from the start


def pg_admin_url() -> str | None:
    """The `test` database as user postgres or root (as tests/service/conftest.py), or None."""
    for user in ("postgres", "root"):
        url = f"postgresql+psycopg://{user}@127.0.0.1:5432/test"
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return url
        except Exception:
            continue
        finally:
            engine.dispose()
    return None


class Server:
    """The service under uvicorn in a child process, with CDSP_* settings; stopped with SIGTERM."""

    def __init__(self, db_url: str, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "server.log"
        self.env = {
            **os.environ,
            "CDSP_DATA_DIR": str(workdir / "cdsp-data"),
            "CDSP_STORAGE": str(workdir / "artifacts"),
            "CDSP_DATABASE_URL": db_url,
            "CDSP_RAY_ADDRESS": UNREACHABLE_RAY,
            "CDSP_API_TOKENS": TOKEN,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        cmd = [sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"the service did not start; its log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


async def run_load(
    url: str, body: dict[str, Any], rate: float, seconds: float, submit_fraction: float, list_fraction: float
) -> dict[str, Any]:
    """Send `rate * seconds` requests at their due times; per request: kind, latency (s), status, send lag (s)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    rng = random.Random(0)
    records: list[tuple[str, float, str, float]] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30.0) as client:
        ids = []
        for _ in range(SEED_EXPERIMENTS):
            r = await client.post("/v1/experiments", json=body)
            r.raise_for_status()
            ids.append(r.json()["id"])

        async def one(kind: str, due: float, target: str) -> None:
            lag = time.perf_counter() - due
            try:
                if kind == "submit":
                    r = await client.post("/v1/experiments", json=body)
                else:
                    r = await client.get(target)
                status = str(r.status_code)
                if kind == "submit" and r.is_success:
                    ids.append(r.json()["id"])
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            records.append((kind, time.perf_counter() - due, status, lag))

        tasks = []
        start = time.perf_counter() + 0.1
        for i in range(round(rate * seconds)):
            due = start + i / rate
            u = rng.random()
            if u < submit_fraction:
                kind, target = "submit", ""
            elif u < submit_fraction + list_fraction:
                kind, target = "list", "/v1/experiments?limit=20"
            else:
                kind, target = "poll", f"/v1/experiments/{rng.choice(ids)}"
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(kind, due, target)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {"records": records, "elapsed_s": elapsed}


def summarise(records: list[tuple[str, float, str, float]], elapsed: float) -> dict[str, dict[str, Any]]:
    """Per kind and overall: count, errors, req/s, latency percentiles (ms)."""
    out = {}
    for kind in ("submit", "poll", "list", "all"):
        rows = [r for r in records if kind in ("all", r[0])]
        if not rows:
            continue
        ms = np.array([r[1] for r in rows]) * 1000
        codes = Counter(r[2] for r in rows)
        errors = {c: n for c, n in codes.items() if not (c.isdigit() and 200 <= int(c) < 300)}
        out[kind] = {
            "requests": len(rows),
            "errors": sum(errors.values()),
            "error_codes": errors,
            "req_per_s": len(rows) / elapsed,
            **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)},
            "max_ms": float(ms.max()),
            "send_lag_p99_ms": float(np.percentile([r[3] for r in rows], 99) * 1000),
        }
    return out


def bench_backend(backend: str, body: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    workdir = tmp / backend
    workdir.mkdir(parents=True)
    schema, admin = None, None
    if backend == "sqlite":
        db_url = f"sqlite:///{workdir / 'cdsp.db'}"
    else:
        if (admin_url := pg_admin_url()) is None:
            return {"skipped": "PostgreSQL is not reachable on 127.0.0.1:5432 (database test, user postgres or root)"}
        schema = f"cdsp_bench_{os.getpid()}_{secrets.token_hex(4)}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        db_url = f"{admin_url}?options=-csearch_path%3D{schema}"
    try:
        with Server(db_url, workdir) as server:
            load = asyncio.run(
                run_load(server.url, body, args.rate, args.seconds, args.submit_fraction, args.list_fraction)
            )
        return {"elapsed_s": load["elapsed_s"], "kinds": summarise(load["records"], load["elapsed_s"])}
    finally:
        if admin is not None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="offered requests per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of the load, per backend")
    parser.add_argument("--backends", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"])
    parser.add_argument("--submit-fraction", type=float, default=0.1, help="share of POST /v1/experiments")
    parser.add_argument("--list-fraction", type=float, default=0.05, help="share of GET /v1/experiments?limit=20")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per backend (a fresh server each); verdict on the median"
    )
    args = parser.parse_args()
    if args.submit_fraction + args.list_fraction > 1:
        parser.error("--submit-fraction plus --list-fraction must be at most 1")
    spec = yaml.safe_load((ROOT / "configs" / "synthetic-demo.yaml").read_text())
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="cdsp-bench-api-") as tmp_name:
        tmp = Path(tmp_name)
        spec["data"]["root"] = str(tmp / "dataset")
        generate(tmp / "dataset", 4, 2, spec["data"]["crop_size"], spec["data"]["num_classes"], 0)
        body = {"spec": spec, "priority": 0}
        for r in range(args.rounds):  # interleaved, so that drift on the machine hits both backends alike
            for backend in args.backends:
                print(f"{backend} round {r + 1}/{args.rounds}: {args.rate:g} req/s for {args.seconds:g} s", flush=True)
                results.setdefault(backend, []).append(bench_backend(backend, body, args, tmp / f"round{r}"))

    rows, verdicts = [], []
    for backend, rounds in results.items():
        if any("skipped" in res for res in rounds):
            verdicts.append(f"- {backend}: skipped ({rounds[0].get('skipped')})")
            continue
        for r, res in enumerate(rounds, 1):
            for kind, s in res["kinds"].items():
                ms = [f"{s[k]:.1f}" for k in ("req_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms", "send_lag_p99_ms")]
                rows.append([backend, r, kind, s["requests"], s["errors"], *ms])
        p99s = sorted(res["kinds"]["all"]["p99_ms"] for res in rounds)
        p99 = p99s[len(p99s) // 2]
        errors = sum(res["kinds"]["all"]["errors"] for res in rounds)
        if args.rate < TARGET_RATE:
            verdict = f"not tested (offered {args.rate:g} req/s, below {TARGET_RATE:g})"
        else:
            verdict = "**met**" if p99 < TARGET_P99_MS and errors == 0 else "**missed**"
        verdicts.append(
            f"- {backend}: median p99 over {len(rounds)} round(s) {p99:.1f} ms "
            f"(rounds: {', '.join(f'{v:.1f}' for v in p99s)}), {errors} errors: "
            f"target (p99 < {TARGET_P99_MS:g} ms at {TARGET_RATE:g} req/s) {verdict}"
        )
    headers = ["backend", "round", "kind", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    headers.append("send lag p99 ms")
    md = table(headers, rows)
    md += (
        f"\n\nOffered {args.rate:g} req/s for {args.seconds:g} s per backend, open loop "
        f"({args.submit_fraction:.0%} submits, {args.list_fraction:.0%} lists, the rest status polls); "
        "latency from each request's due time (send lag: how late the generator sent it).\n"
        f"Target: p99 < {TARGET_P99_MS:g} ms at {TARGET_RATE:g} req/s, no errors.\n\n" + "\n".join(verdicts) + "\n"
    )
    print(md)
    payload = {
        "rate": args.rate,
        "seconds": args.seconds,
        "submit_fraction": args.submit_fraction,
        "list_fraction": args.list_fraction,
        "rounds": args.rounds,
        "target": {"p99_ms": TARGET_P99_MS, "rate": TARGET_RATE},
        "backends": results,
    }
    json_path, md_path = write_results("api", torch.device("cpu"), payload, md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
