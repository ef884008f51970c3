"""deploy/docker: base images at the pinned versions, and build inputs that exist and are sent."""

from __future__ import annotations

import fnmatch
import re
import subprocess

import pytest

from tests.deploy.helpers import DOCKER_DIR, ROOT, Dockerfile, python_tag, ray_version, torch_pins

pytestmark = pytest.mark.timeout(60)

RAY_NODE = DOCKER_DIR / "ray.Dockerfile"
API = DOCKER_DIR / "api.Dockerfile"


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def ignored(path: str) -> bool:
    """Docker's rule, closely enough for our patterns: the last matching line wins, `!` re-includes."""
    verdict = False
    for pattern in dockerignore():
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(parts[-1], pattern):
            verdict = not negate
    return verdict


def test_ray_node_base_image_is_rayproject_at_pinned_versions() -> None:
    import torch

    cuda = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else None
    (base,) = Dockerfile(RAY_NODE).base_images
    # torch from PyPI brings its own CUDA runtime; the image's CUDA is the same release line.
    assert base == f"rayproject/ray:{ray_version()}-{python_tag()}-{cuda or 'cu130'}"


def test_api_base_image_is_the_cpu_flavour_of_the_same_release() -> None:
    (base,) = Dockerfile(API).base_images
    assert base == f"rayproject/ray:{ray_version()}-{python_tag()}-cpu"


@pytest.mark.parametrize("path", [RAY_NODE, API], ids=lambda p: p.name)
def test_pins_match_the_tested_stack(path) -> None:
    dockerfile = Dockerfile(path)
    assert dockerfile.args["RAY_VERSION"] == ray_version()
    pins = torch_pins()
    assert dockerfile.args["TORCH_VERSION"] == pins["torch"], "torch pin differs from scripts/setup.sh"
    assert dockerfile.args["TORCHVISION_VERSION"] == pins["torchvision"], "torchvision pin differs from setup.sh"
    # Ray is pinned in the pip call that installs our package, so resolving it cannot move Ray.
    (install,) = [ln for ln in dockerfile.lines if ln.startswith("RUN pip install") and re.search(r"\s\.\s", ln)]
    assert '"ray[default,train,tune]==${RAY_VERSION}"' in install


@pytest.mark.parametrize("path", [RAY_NODE, API], ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_build_context(path) -> None:
    copies = Dockerfile(path).copies
    assert copies, f"{path.name} copies nothing"
    for sources, _ in copies:
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
            assert not ignored(src), f"{path.name}: COPY {src} is excluded by .dockerignore"
    copied = {src for sources, _ in copies for src in sources}
    assert {"pyproject.toml", "README.md", "cdsp_core", "workers", "service"} <= copied


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    for path in (".env", ".venv/bin/python", ".git/config", "data/VOC2012/x.jpg", "cdsp_core/__pycache__/a.pyc"):
        assert ignored(path), f"{path} would be sent to the Docker daemon"
    assert not ignored(".env.example")


def test_worker_start_script_is_valid_bash() -> None:
    out = subprocess.run(["bash", "-n", str(DOCKER_DIR / "ray-worker-start.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
