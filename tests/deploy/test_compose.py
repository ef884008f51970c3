"""docker-compose.yml, checked without a Docker engine.

Static checks on the parsed file (services, dependencies, health checks, volumes, ports, the GPU
reservation, environment names, image tags), the compose-spec JSON schema, and `config -q` by a
real Compose v2 client where one can run here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.deploy.helpers import (
    COMPOSE_FILE,
    DOCKER_DIR,
    ENV_EXAMPLE,
    REQUIRED_API_SETTINGS,
    ROOT,
    Dockerfile,
    compose,
    compose_client,
    default_of,
    project_version,
    python_tag,
    ray_version,
    variables,
)

pytestmark = pytest.mark.timeout(120)

SERVICES = {"postgres", "minio", "minio-init", "ray-head", "ray-worker", "api"}
ONE_SHOT = {"minio-init"}


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def env(service: str) -> dict[str, str]:
    value = services()[service].get("environment", {})
    assert isinstance(value, dict), f"{service}: write environment as a mapping"
    return {k: str(v) for k, v in value.items()}


def command(service: str) -> list[str]:
    value = services()[service]["command"]
    assert isinstance(value, list), f"{service}: write command as a list (exec form)"
    return value


def flag(args: list[str], name: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith(f"{name}=")]
    return value


def published(service: str) -> dict[int, str]:
    """container port -> host port (defaults substituted), from `[ip:]host:container` entries."""
    out = {}
    for entry in services()[service].get("ports", []):
        parts = default_of(str(entry)).split(":")
        out[int(parts[-1])] = parts[-2]
    return out


def test_services_present() -> None:
    assert set(services()) == SERVICES


def test_depends_on_targets_exist_with_conditions_that_can_be_met() -> None:
    for name, svc in services().items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions (long form)"
        for target, cond in deps.items():
            assert target in services(), f"{name} depends on unknown service {target}"
            condition = cond["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services()[target], f"{name} waits for {target} to be healthy: no healthcheck"
            elif condition == "service_completed_successfully":
                assert target in ONE_SHOT, f"{name} waits for {target} to exit, but it is a long-running service"
            else:
                pytest.fail(f"{name} -> {target}: condition {condition!r} waits for nothing useful")


def test_dependencies_have_no_cycle() -> None:
    deps = {n: set(s.get("depends_on", {})) for n, s in services().items()}
    started: list[str] = []
    while len(started) < len(deps):
        ready = [n for n in deps if n not in started and deps[n] <= set(started)]
        assert ready, f"dependency cycle among {set(deps) - set(started)}"
        started += ready
    assert started.index("api") > max(started.index(d) for d in ("postgres", "minio-init", "ray-head"))


def test_long_running_services_have_healthchecks_and_restart() -> None:
    for name, svc in services().items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", f"{name} must not restart after it finished"
            continue
        check = svc.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test must be CMD or CMD-SHELL"
        assert svc.get("restart") == "unless-stopped", f"{name} does not come back after a crash or reboot"


def test_named_volumes_declared_and_used() -> None:
    declared = set(compose().get("volumes") or {})
    used = set()
    for svc in services().values():
        for vol in svc.get("volumes", []):
            source = str(vol).split(":", 1)[0]
            if not source.startswith(("/", ".", "$")):
                used.add(source)
    assert used == declared, f"used {sorted(used)}, declared {sorted(declared)}"
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in services()["postgres"]["volumes"]}
    assert mounts["postgres-data"] == "/var/lib/postgresql/data"
    mounts = {str(v).split(":")[0]: str(v).split(":")[1] for v in services()["minio"]["volumes"]}
    assert mounts["minio-data"] == command("minio")[1], "MinIO must serve the folder its volume is mounted on"


def test_gpu_worker_reservation_and_scaling() -> None:
    worker = services()["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    # Every replica gets the same devices from Docker; ray-worker-start.sh shares them out.
    assert device["count"] == "all"
    assert worker.get("shm_size"), "the object store and DataLoader workers need /dev/shm"
    assert int(re.fullmatch(r"(\d+)gb", default_of(worker["shm_size"]))[1]) >= 8  # type: ignore[index]
    # `--scale ray-worker=N` needs no fixed name and no fixed host port.
    assert "container_name" not in worker
    assert "ports" not in worker
    assert "deploy" not in services()["ray-head"], "the head trains nothing: no GPU for it"


def test_worker_gpu_claims_volume_matches_script_and_image() -> None:
    worker = services()["ray-worker"]
    claims = env("ray-worker")["CDSP_GPU_CLAIMS"]
    targets = {str(v).split(":")[1]: str(v).split(":")[0] for v in worker["volumes"]}
    assert targets.get(claims) == "gpu-claims", "the replicas must share one claims volume"
    script = (DOCKER_DIR / "ray-worker-start.sh").read_text()
    assert f"CDSP_GPU_CLAIMS:-{claims}" in script
    ray_node = Dockerfile(DOCKER_DIR / "ray.Dockerfile")
    assert any(ln == f"RUN mkdir -p {claims}" for ln in ray_node.lines), "the image must own the claims folder"
    copied = {dst for _, dst in ray_node.copies}
    assert command("ray-worker") == ["bash", "/home/ray/ray-worker-start.sh"]
    assert "/home/ray/ray-worker-start.sh" in copied


def test_ray_ports_line_up() -> None:
    head = command("ray-head")
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    gcs, dashboard = int(flag(head, "--port")), int(flag(head, "--dashboard-port"))
    assert flag(head, "--dashboard-host") == "0.0.0.0", "the api reaches the dashboard from another container"
    assert str(gcs) in [str(p) for p in services()["ray-head"]["expose"]]
    assert published("ray-head") == {dashboard: "8265"}
    host, port = env("ray-worker")["RAY_HEAD_ADDRESS"].split(":")
    assert (host, int(port)) == ("ray-head", gcs)
    address = urlparse(default_of(env("api")["CDSP_RAY_ADDRESS"]))  # .env may point it at another cluster
    assert (address.scheme, address.hostname, address.port) == ("http", "ray-head", dashboard)
    assert f"127.0.0.1:{dashboard}/api/gcs_healthz" in " ".join(services()["ray-head"]["healthcheck"]["test"])


def test_api_port_command_and_healthcheck_agree() -> None:
    cmd = command("api")
    assert cmd[:2] == ["cdsp", "serve"]
    port = int(cmd[cmd.index("--port") + 1])
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert published("api") == {port: "8000"}
    assert f"127.0.0.1:{port}/healthz" in " ".join(services()["api"]["healthcheck"]["test"])
    assert Dockerfile(DOCKER_DIR / "api.Dockerfile").cmd == cmd, "compose and the image start the api alike"


def test_api_environment_names_are_service_settings() -> None:
    from service.settings import Settings

    prefix = Settings.model_config["env_prefix"]
    known = {f"{prefix}{name}".upper() for name in Settings.model_fields}
    api_env = env("api")
    ours = {k for k in api_env if k.startswith("CDSP_")}
    assert ours >= REQUIRED_API_SETTINGS, f"missing {REQUIRED_API_SETTINGS - ours}"
    assert ours <= known, f"the service has no setting named {ours - known}"


def test_api_points_at_the_database_and_bucket_of_this_file() -> None:
    api_env = env("api")
    db = urlparse(api_env["CDSP_DATABASE_URL"])
    pg = env("postgres")
    assert db.scheme == "postgresql+psycopg"
    assert (db.hostname, db.port, db.path.lstrip("/")) == ("postgres", 5432, pg["POSTGRES_DB"])
    assert db.username == pg["POSTGRES_USER"]
    assert variables(db.password or "") == variables(pg["POSTGRES_PASSWORD"]) == {"POSTGRES_PASSWORD"}
    storage = urlparse(default_of(api_env["CDSP_STORAGE"]))
    assert storage.scheme == "s3"
    assert storage.hostname == default_of(env("minio-init")["BUCKET"]), "the api writes to the bucket minio-init made"


def test_s3_and_ray_token_reach_every_node_and_the_api() -> None:
    api, head, worker = env("api"), env("ray-head"), env("ray-worker")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        assert api[name] == head[name] == worker[name], name
    endpoint = urlparse(api["AWS_ENDPOINT_URL"])
    assert (endpoint.hostname, endpoint.port) == ("minio", 9000)
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        assert api[name] == head[name] == worker[name], name
    assert api["RAY_AUTH_MODE"] == "token"
    # The service user is not MinIO's root account.
    assert api["AWS_ACCESS_KEY_ID"] != env("minio")["MINIO_ROOT_USER"]
    init_script = command("minio-init")[0]
    assert "$$S3_ACCESS_KEY" in init_script and "mc mb --ignore-existing" in init_script


def test_image_tags_agree_with_pinned_versions() -> None:
    version, py = ray_version(), python_tag()
    for name, dockerfile in (
        ("ray-head", "ray.Dockerfile"),
        ("ray-worker", "ray.Dockerfile"),
        ("api", "api.Dockerfile"),
    ):
        svc = services()[name]
        assert svc["build"]["dockerfile"] == f"deploy/docker/{dockerfile}"
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        tag = default_of(svc["image"]).rsplit(":", 1)[1]
        assert tag.startswith(f"{project_version()}-ray{version}-{py}"), f"{name}: image tag {tag}"
    assert services()["ray-head"]["image"] == services()["ray-worker"]["image"], "one image for all Ray nodes"


def test_env_example_defines_exactly_the_variables_compose_reads() -> None:
    text = COMPOSE_FILE.read_text()
    used = variables(text)
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", text))
    defined = {ln.split("=", 1)[0] for ln in ENV_EXAMPLE.read_text().splitlines() if re.match(r"[A-Z][A-Z0-9_]*=", ln)}
    assert required <= defined, f".env.example lacks required {required - defined}"
    assert defined <= used, f".env.example sets variables compose never reads: {defined - used}"
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, _, value = line.partition("=")
        if name in required and name.endswith(("TOKENS", "TOKEN", "PASSWORD", "SECRET_KEY")):
            assert value.startswith("change-me"), f"{name}: .env.example must not ship a usable secret"


def test_compose_spec_schema() -> None:
    # check-jsonschema (dev extra) vendors the compose-spec schema.
    out = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_docker_compose_config() -> None:
    client = compose_client()
    if client is None:
        pytest.skip("no Docker Compose v2 client here (`docker compose version` fails)")
    # The shell's own values would win over the env file: leave out every variable compose reads.
    clean = {k: v for k, v in os.environ.items() if k not in variables(COMPOSE_FILE.read_text())}

    def config(env_file: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [*client, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--env-file", env_file, "config"]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, env=clean)

    quiet = config(str(ENV_EXAMPLE), "-q")
    assert quiet.returncode == 0, quiet.stderr
    resolved = config(str(ENV_EXAMPLE), "--format", "json")
    assert resolved.returncode == 0, resolved.stderr
    model = json.loads(resolved.stdout)
    api = model["services"]["api"]["environment"]
    assert api["CDSP_RAY_ADDRESS"] == "http://ray-head:8265"
    assert api["CDSP_STORAGE"] == "s3://cdsp-artifacts/runs"
    assert urlparse(api["CDSP_DATABASE_URL"]).password == "change-me-postgres"
    (device,) = model["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["count"] == -1  # "all"
    # Without the .env values the file must refuse to start rather than run with empty secrets.
    bare = config(os.devnull, "-q")
    assert bare.returncode != 0 and "in .env" in bare.stderr
