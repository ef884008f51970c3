"""deploy/kuberay: the RayCluster, the api Deployment/Service, Secrets, the database reference
and the RayJob example, checked without a Kubernetes cluster.

Field names of the ray.io/v1 specs are checked against the KubeRay v1 API types (listed below from
the CRD reference), and those of the pod templates against the core fields we use, so a typo
(`workerGroupSpec`, `maxReplica`) fails here instead of being pruned silently by the API server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from cdsp_core.spec import load_spec
from tests.deploy.helpers import KUBERAY_DIR, REQUIRED_API_SETTINGS, ROOT, manifests, project_version, ray_version

pytestmark = pytest.mark.timeout(60)

API_VERSIONS = {
    "Namespace": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1",
    "RayCluster": "ray.io/v1",
    "RayJob": "ray.io/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}

# ray.io/v1 (KubeRay 1.6) fields.
RAY_CLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "managedBy", "rayVersion", "suspend", "upgradeStrategy", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_SPEC = {
    "enableIngress", "headService", "rayStartParams", "serviceType", "template", "resources", "labels",
}  # fmt: skip
WORKER_GROUP_SPEC = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels",
}  # fmt: skip
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode", "version",
}  # fmt: skip
AUTH_OPTIONS = {"mode", "secretName"}
RAY_JOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode", "submitterConfig",
    "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
# Core v1 fields used by our pod templates (a subset: extend when a manifest needs more).
POD_SPEC = {
    "containers", "initContainers", "volumes", "securityContext", "tolerations", "nodeSelector", "affinity",
    "serviceAccountName", "imagePullSecrets", "priorityClassName", "terminationGracePeriodSeconds",
}  # fmt: skip
CONTAINER = {
    "name", "image", "imagePullPolicy", "command", "args", "workingDir", "ports", "env", "envFrom", "resources",
    "volumeMounts", "readinessProbe", "livenessProbe", "startupProbe", "securityContext", "lifecycle",
}  # fmt: skip


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in by_kind(kind) if name is None or d["metadata"]["name"] == name]
    return doc


def secret_keys() -> dict[str, set[str]]:
    return {s["metadata"]["name"]: set(s.get("stringData", {})) | set(s.get("data", {})) for s in by_kind("Secret")}


def config_keys() -> dict[str, dict[str, str]]:
    return {c["metadata"]["name"]: c["data"] for c in by_kind("ConfigMap")}


def ray_cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    specs = [(f"RayCluster {c['metadata']['name']}", c["spec"]) for c in by_kind("RayCluster")]
    specs += [(f"RayJob {j['metadata']['name']}", j["spec"]["rayClusterSpec"]) for j in by_kind("RayJob")]
    return specs


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for where, spec in ray_cluster_specs():
        out.append((f"{where} head", spec["headGroupSpec"]["template"]))
        out += [(f"{where} {g['groupName']}", g["template"]) for g in spec["workerGroupSpecs"]]
    out += [(f"Deployment {d['metadata']['name']}", d["spec"]["template"]) for d in by_kind("Deployment")]
    return out


def env_names(container: dict[str, Any]) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for src in container.get("envFrom", []):
        names |= set(config_keys()[src["configMapRef"]["name"]])
    return names


def test_kinds_api_versions_and_namespace() -> None:
    assert manifests(), "no manifests found"
    for path, doc in manifests():
        kind = doc.get("kind")
        assert kind in API_VERSIONS, f"{path.name}: unexpected kind {kind}"
        assert doc["apiVersion"] == API_VERSIONS[kind], f"{path.name}: {kind} is {API_VERSIONS[kind]}"
        if kind not in ("Namespace", "Kustomization"):
            assert doc["metadata"]["namespace"] == "cdsp", f"{path.name}: {kind} outside the cdsp namespace"
    assert one("Namespace")["metadata"]["name"] == "cdsp"


def test_kustomization_lists_every_manifest_but_secrets_and_examples() -> None:
    kust = one("Kustomization")
    listed = set(kust["resources"])
    assert all((KUBERAY_DIR / r).is_file() for r in listed)
    expected = {p.name for p in KUBERAY_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    expected = {n for n in expected if "example" not in n}
    assert listed == expected
    assert kust["namespace"] == "cdsp"


def test_ray_specs_use_known_fields() -> None:
    for where, spec in ray_cluster_specs():
        assert set(spec) <= RAY_CLUSTER_SPEC, f"{where}: unknown fields {set(spec) - RAY_CLUSTER_SPEC}"
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP_SPEC, where
        assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS, where
        assert set(spec.get("authOptions", {})) <= AUTH_OPTIONS, where
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP_SPEC, f"{where}: unknown fields {set(group) - WORKER_GROUP_SPEC}"
    for job in by_kind("RayJob"):
        assert set(job["spec"]) <= RAY_JOB_SPEC, f"unknown RayJob fields {set(job['spec']) - RAY_JOB_SPEC}"


def test_pod_templates_use_known_fields_and_their_own_volumes() -> None:
    claims = {p["metadata"]["name"] for p in by_kind("PersistentVolumeClaim")}
    for where, template in pod_templates():
        spec = template["spec"]
        assert set(spec) <= POD_SPEC, f"{where}: unknown pod fields {set(spec) - POD_SPEC}"
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            assert set(container) <= CONTAINER, f"{where}: unknown container fields {set(container) - CONTAINER}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: mounts undeclared volume {mount['name']}"
        for vol in volumes.values():
            if "persistentVolumeClaim" in vol:
                assert vol["persistentVolumeClaim"]["claimName"] in claims, f"{where}: unknown PVC"


def test_ray_versions_and_images_agree_with_the_pinned_ray() -> None:
    version = ray_version()
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == version, where
    for where, template in pod_templates():
        for container in template["spec"]["containers"]:
            tag = container["image"].rsplit(":", 1)[1]
            assert tag.startswith(f"{project_version()}-ray{version}-py311"), f"{where}: image {container['image']}"
            if "ray-" in container["name"]:
                assert "/ray-node:" in container["image"] and tag.endswith("-cu130"), where


def test_ray_start_params_are_strings_and_head_does_no_work() -> None:
    for where, spec in ray_cluster_specs():
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            params = group["rayStartParams"]
            assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values are strings"
        assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0", where
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0", where


def test_head_ports() -> None:
    for where, spec in ray_cluster_specs():
        (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert ports["dashboard"] == 8265 and ports["gcs-server"] == 6379, where


def test_gpu_workers_autoscale_with_gpu_limits_and_shm() -> None:
    for where, spec in ray_cluster_specs():
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
            assert group["maxReplicas"] >= 1, where
            pod = group["template"]["spec"]
            (container,) = pod["containers"]
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}: no GPU limit"
            assert requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"], where
            shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm, f"{where}: /dev/shm not mounted"
            (vol,) = [v for v in pod["volumes"] if v["name"] == shm[0]["name"]]
            assert vol["emptyDir"]["medium"] == "Memory", where
            assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), where
    cluster = one("RayCluster")["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["workerGroupSpecs"][0]["maxReplicas"] > cluster["workerGroupSpecs"][0]["minReplicas"]


def test_secret_and_configmap_references_resolve() -> None:
    secrets, configs = secret_keys(), config_keys()
    for where, template in pod_templates():
        for container in template["spec"]["containers"]:
            for e in container.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: {e['name']} -> missing {ref}"
            for src in container.get("envFrom", []):
                assert src["configMapRef"]["name"] in configs, where
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= env_names(container), where


def test_token_auth_end_to_end() -> None:
    """The cluster's token Secret is the one the api sends to the Jobs API."""
    auth = one("RayCluster")["spec"]["authOptions"]
    assert auth["mode"] == "token"
    assert "auth_token" in secret_keys()[auth["secretName"]]
    (api,) = one("Deployment", "cdsp-api")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in api["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}
    for job in by_kind("RayJob"):
        assert job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_api_deployment_service_and_settings() -> None:
    from service.settings import Settings

    deployment, service = one("Deployment", "cdsp-api"), one("Service", "cdsp-api")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (api,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert api["command"][api["command"].index("--port") + 1] == str(ports["http"])
    # Readiness must send a token (every route but /healthz needs one): an exec probe with the first token.
    probe = " ".join(api["readinessProbe"]["exec"]["command"])
    assert f"127.0.0.1:{ports['http']}/readyz" in probe and "CDSP_API_TOKENS" in probe and "Bearer" in probe
    assert "httpGet" not in api["readinessProbe"]
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    names = {n for n in env_names(api) if n.startswith("CDSP_")}
    assert names >= REQUIRED_API_SETTINGS, f"missing {REQUIRED_API_SETTINGS - names}"
    known = {f"CDSP_{f}".upper() for f in Settings.model_fields}
    assert names <= known, f"the service has no setting named {names - known}"


def test_api_reaches_the_head_service_kuberay_creates() -> None:
    cluster = one("RayCluster")
    address = urlparse(config_keys()["cdsp-config"]["CDSP_RAY_ADDRESS"])
    assert address.hostname == f"{cluster['metadata']['name']}-head-svc.cdsp.svc.cluster.local"
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert address.port == {p["name"]: p["containerPort"] for p in head["ports"]}["dashboard"]


def test_database_reference() -> None:
    db = one("Service", "cdsp-postgres")
    assert db["spec"]["type"] == "ExternalName" and db["spec"]["externalName"]
    (secret,) = [s for s in by_kind("Secret") if s["metadata"]["name"] == "cdsp-api"]
    url = urlparse(secret["stringData"]["database-url"])
    assert url.scheme == "postgresql+psycopg"
    assert url.hostname == f"{db['metadata']['name']}.cdsp.svc.cluster.local"
    assert url.port == db["spec"]["ports"][0]["port"]


def test_storage_is_s3_and_datasets_are_shared() -> None:
    assert urlparse(config_keys()["cdsp-config"]["CDSP_STORAGE"]).scheme == "s3"
    pvc = one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every GPU worker mounts the datasets"


def test_rayjob_entrypoint_runs_a_shipped_recipe_with_valid_overrides() -> None:
    (job,) = by_kind("RayJob")
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["cdsp", "run"]
    config = words[2]
    assert config.startswith("/home/ray/cdsp/configs/"), "the image ships configs/ at /home/ray/cdsp/configs"
    local = ROOT / "configs" / Path(config).name
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    spec = load_spec(local, overrides)  # raises on an unknown key or a bad value
    assert spec.data.root.startswith("/data/")
    out = words[words.index("--out") + 1]
    assert urlparse(out).scheme == "s3"
    assert "--ray" in words and words[words.index("--address") + 1] == "auto"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    gpus = sum(int(g["replicas"]) for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert spec.resources.num_workers <= gpus, "more DDP workers than GPU pods: the job would never start"
