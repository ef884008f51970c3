"""Multi-node drill: a Ray head and two worker nodes, a 2-worker DDP pipeline with one worker per node and
its run folder on S3, one worker node killed whole in the middle of a stage-2 epoch.

Where the machine allows it (root, `ip netns`), each worker node is a separate host: its own network
namespace with its own address and port space, joined to the head's by veth pairs on a bridge, as
production nodes are joined by a network. Otherwise the nodes are separate `ray start` processes on
loopback with their own ports. Either way each node has its own temp folders (so its own pseudo-label
cache): what one node's rank labels reaches the other only through the S3 server.

Expected: stage 1's pseudo-label pass splits the training split across both nodes, each node ends with
the whole set fetched from S3; the lost node takes one rank, Ray Train restarts the group on the node
left (`resources.placement: spread` is best effort, both workers fit on one node) from the latest
checkpoint, and the run finishes with every epoch logged once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cdsp_core import runs
from cdsp_core.data.layout import Layout, read_ids
from cdsp_core.ray_head import Head, free_port_range, free_ports, pid_alive, start_head, stop_head
from tests.s3 import S3Server
from tests.workers.helpers import REPO, tiny_spec

STAGE2_EPOCHS, TRAIN = 4, 16


@dataclass(frozen=True)
class Host:
    name: str
    ip: str
    netns: str | None  # None: a process on this host's loopback


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextmanager
def separate_hosts(n: int) -> Iterator[tuple[str, list[Host]]]:
    """`n` hosts for worker nodes and the address the head should use: network namespaces on a bridge
    when the machine allows it (and `CDSP_DRILL_LOOPBACK` is not set), else loopback processes."""
    made: list[tuple[str, ...]] = []  # how to remove each thing made, newest last
    try:
        found = None if os.environ.get("CDSP_DRILL_LOOPBACK") else _namespaces(n, made)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        _remove(made)
        made, found = [], None
        print(f"network namespaces unavailable ({e}); worker nodes run on loopback")
    try:
        yield found or ("127.0.0.1", [Host(f"node{i}", "127.0.0.1", None) for i in range(n)])
    finally:
        _remove(made)


def _namespaces(n: int, made: list[tuple[str, ...]]) -> tuple[str, list[Host]]:
    tag = f"{os.getpid() % 100000:05d}"
    bridge = f"cdspbr{tag}"
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(0, 250)}"
    _ip("link", "add", bridge, "type", "bridge")
    made.append(("link", "del", bridge))
    _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
    _ip("link", "set", bridge, "up")
    hosts = []
    for i in range(n):
        ns, veth = f"cdsp{tag}n{i}", f"cdspv{tag}{i}"
        _ip("netns", "add", ns)
        made.append(("netns", "del", ns))  # takes its end of the veth pair, and so the pair, along
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", bridge, "up")
        _ip("-n", ns, "addr", "add", f"{subnet}.{i + 2}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "route", "add", "default", "via", f"{subnet}.1")
        hosts.append(Host(f"node{i}", f"{subnet}.{i + 2}", ns))
    return f"{subnet}.1", hosts


def _remove(made: list[tuple[str, ...]]) -> None:
    for args in reversed(made):
        with suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            _ip(*args)


@dataclass
class Node:
    host: Host
    proc: subprocess.Popen[bytes]
    temp: Path  # its Ray temp folder and TMPDIR: the node's own pseudo-label cache lives under it

    def cache_files(self) -> set[str]:
        return {p.name for p in (self.temp / "tmp" / "cdsp-pseudo").glob("*/*.png")}


def start_node(head: Head, host: Host, env: dict[str, str], log: Path) -> Node:
    """`ray start --address=HEAD --block` on `host` with 2 CPUs, in its own process group."""
    temp = Path(tempfile.mkdtemp(prefix=f"cdsp-{host.name}-", dir="/tmp"))
    (temp / "tmp").mkdir()
    cmd = ["ip", "netns", "exec", host.netns] if host.netns else []
    cmd += [sys.executable, "-m", "ray.scripts.scripts", "start", f"--address={head.gcs_address}", "--block"]
    cmd += [f"--node-ip-address={host.ip}", "--num-cpus=2", f"--temp-dir={temp / 'ray'}", "--disable-usage-stats"]
    if host.netns is None:  # sharing the port space with the head: every port explicit and free
        flags = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")  # fmt: skip
        cmd += [f"--{f}={p}" for f, p in zip(flags, free_ports(len(flags)), strict=True)]
        lo, hi = free_port_range()
        cmd += [f"--min-worker-port={lo}", f"--max-worker-port={hi}"]
    node_env = {**env, **head.auth_env(), "TMPDIR": str(temp / "tmp"), "RAY_USAGE_STATS_ENABLED": "0"}
    if host.netns:
        # The hosts share one hostname, which resolves to loopback: without naming the interface gloo
        # tells the other ranks to connect to 127.0.0.1 (the README's multi-node note).
        node_env["GLOO_SOCKET_IFNAME"] = "eth0"
    proc = subprocess.Popen(
        cmd, env=node_env, stdout=log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    return Node(host, proc, temp)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Ray's processes do not all stay in the process group of `ray start`)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def node_pids(node: Node) -> list[int]:
    """Every process of the node: below its `ray start`, and (a separate host) every one in its namespace."""
    pids = {node.proc.pid, *descendants(node.proc.pid)}
    if node.host.netns:
        with suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            out = subprocess.run(["ip", "netns", "pids", node.host.netns], capture_output=True, text=True, timeout=10)
            pids |= {int(p) for p in out.stdout.split()}
    return sorted(pids)


def kill_node(node: Node) -> list[int]:
    """The whole node at once: `ray start`, its raylet, agents and workers, no clean-up. Returns the
    pids killed, once every one of them has exited (a SIGKILLed process may take a moment)."""
    pids = node_pids(node)
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.proc.wait(timeout=10)
    deadline = time.monotonic() + 15
    while [p for p in pids if pid_alive(p) and _state(p) != "Z"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return pids


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def alive_nodes(head: Head) -> list[dict[str, Any]]:
    assert head.dashboard_url is not None
    req = urllib.request.Request(
        f"{head.dashboard_url}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {head.token}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        nodes = json.load(r)["data"]["result"]["result"]
    return [n for n in nodes if n["state"] == "ALIVE"]


def wait(predicate: Any, what: str, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.2)


def train_workers_by_node(nodes: list[Node]) -> dict[str, list[int]]:
    """PIDs of the Ray Train worker processes on each node."""
    found: dict[str, list[int]] = {}
    for node in nodes:
        found[node.host.name] = []
        for pid in descendants(node.proc.pid):
            with suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    found[node.host.name].append(pid)
    return found


@pytest.fixture
def drill_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cdsp_core.data.synthetic import generate

    root = tmp_path_factory.mktemp("drill")
    generate(root, num_train=TRAIN, num_val=4, size=64, num_classes=3, seed=3)
    return root


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(480)
def test_a_worker_node_lost_mid_epoch_the_run_finishes_on_the_node_left(
    drill_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto.server import ThreadedMotoServer

    # Node deaths noticed in ~3 s rather than Ray's default ~15-30 s (the head reads these at start).
    monkeypatch.setenv("RAY_health_check_period_ms", "1000")
    monkeypatch.setenv("RAY_health_check_failure_threshold", "3")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    t0 = time.perf_counter()
    with ExitStack() as stack:
        head_ip, hosts = stack.enter_context(separate_hosts(2))
        # The shared storage every node reaches: an S3 server on the head's address.
        s3 = ThreadedMotoServer(ip_address=head_ip, port=0, verbose=False)
        s3.start()
        stack.callback(s3.stop)
        server = S3Server(endpoint_url="http://{}:{}".format(*s3.get_host_and_port()))
        bucket = server.create_bucket()
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        head, head_proc = start_head(num_cpus=0, node_ip=head_ip, log_path=tmp_path / "head.log", cwd=REPO)
        stack.callback(stop_head, head, head_proc)
        nodes = [start_node(head, h, server.env(), tmp_path / f"{h.name}.log") for h in hosts]
        for node in nodes:
            stack.callback(kill_node, node)  # (again at the end: a no-op for the one already killed)
        wait(lambda: len(alive_nodes(head)) == 3, "head and two worker nodes alive", timeout=90)
        if hosts[0].netns:  # (on loopback Ray reports the machine's address for every node)
            assert sorted(n["node_ip"] for n in alive_nodes(head)) == sorted([head_ip, *(h.ip for h in hosts)])
        form = "network namespaces" if hosts[0].netns else "loopback"
        print(f"cluster up ({form}): {time.perf_counter() - t0:.1f} s")

        spec = tiny_spec(
            drill_dataset, stage2__epochs=STAGE2_EPOCHS, stage2__keep_checkpoints=STAGE2_EPOCHS,
            resources__max_failures=1, resources__placement="spread",
        )  # fmt: skip
        spec_path, run = tmp_path / "spec.yaml", f"s3://{bucket}/runs/drill"
        spec_path.write_text(spec.to_yaml())
        log = tmp_path / "run.log"
        cmd = [sys.executable, "-m", "workers.run", "--spec", str(spec_path), "--out", run]
        cmd += ["--address", head.gcs_address]
        env = {**os.environ, **head.auth_env()}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        stack.callback(proc.kill)  # (a no-op once it has ended)

        # Stage 1 done and stage 2's first checkpoint stored: kill the node of one rank inside epoch 2.
        first = runs.join(run, "checkpoints", "stage2-epoch001.pt")
        wait(lambda: runs.exists(first), "stage 2's first checkpoint", timeout=300, proc=proc)
        placed = train_workers_by_node(nodes)
        assert [len(placed[n.host.name]) for n in nodes] == [1, 1], placed  # one worker per node
        # Each node labelled its share into its own cache and fetched the other's from S3.
        names = {f"{i}.png" for i in read_ids(Layout.from_spec(spec.data).train_list)}
        assert len(names) == TRAIN
        for node in nodes:
            assert node.cache_files() == names, (node.host.name, len(node.cache_files()))
        assert set(runs.listdir(runs.join(run, runs.PSEUDO_LABELS))) >= names
        victim = nodes[1]
        time.sleep(0.5)
        doomed = kill_node(victim)
        t_kill = time.perf_counter()
        assert not [pid for pid in doomed if pid_alive(pid) and _state(pid) != "Z"], doomed
        stored_names = runs.listdir(runs.join(run, "checkpoints"))
        stored = max(int(n[len("stage2-epoch") : -3]) for n in stored_names if n.startswith("stage2-"))

        rc = proc.wait(timeout=300)
        text = log.read_text()
        assert rc == 0, text[-4000:]
        now = time.perf_counter()
        print(f"node killed -> run finished: {now - t_kill:.1f} s; whole drill {now - t0:.1f} s")
        resumed = [ln for ln in text.splitlines() if "stage2: resuming from" in ln]
        # From the newest checkpoint: the one stored at the kill (or the next, if rank 0 got to store the
        # epoch the kill fell into), never from epoch 1.
        assert len(resumed) == 1, resumed
        assert resumed[0].endswith((f"at epoch {stored + 1}", f"at epoch {stored + 2}")), (stored, resumed)
        # The restarted group runs on the node left: both of its workers.
        assert len(alive_nodes(head)) == 2

        rows = [r for r in runs.read_jsonl(runs.join(run, runs.METRICS)) if r["stage"] == "stage2"]
        assert [r["epoch"] for r in rows] == list(range(1, STAGE2_EPOCHS + 1))  # each once, in order
        steps = TRAIN // spec.stage2.batch_size
        assert [r["step"] for r in rows] == [steps * e for e in range(1, STAGE2_EPOCHS + 1)]
        result = json.loads(runs.read_text(runs.join(run, "result.json")))
        assert result["epochs"]["stage2"] == STAGE2_EPOCHS
        assert result["checkpoint"] == f"checkpoints/stage2-epoch{STAGE2_EPOCHS:03d}.pt"
