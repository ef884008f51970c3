"""scripts/gpu-pack.py (what travels to a GPU machine with no package index) and
scripts/gpu-pack-install.sh (its set-up there): which packages are carried, what is left out of the
archive, and that the installer refuses a pack for another Python and unpacks a right one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_pack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_pack", REPO / "scripts/gpu-pack.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tight_pins_are_exact_or_one_release_series(gpu_pack: ModuleType) -> None:
    requires = [
        "aiobotocore<4.0.0,>=2.19.0",  # a wide range: the machine's version will do
        "fsspec<2026.9.1,>=2026.9.0",  # one release series (what s3fs asks)
        "aiohttp!=4.0.0a0,!=4.0.0a1,>=3.9.0",  # != is no pin
        "x==1.2",
        "y (==2.0)",  # the old parenthesised form
        'z==1; extra == "tests"',  # an extra's requirement: not installed
        "u<3,>=1.25.4",
        'w>=1.4,<1.5; python_version >= "3.10"',
    ]
    assert gpu_pack.tight_pins(requires) == {"fsspec", "x", "y", "w"}


def _meta(name: str, version: str, *requires: str) -> dict[str, object]:
    meta: dict[str, object] = {"name": name, "version": version}
    if requires:
        meta["requires_dist"] = list(requires)
    return {"metadata": meta}  # type: ignore[return-value]


def test_plan_carries_what_the_machine_lacks_and_what_a_carried_package_pins(gpu_pack: ModuleType) -> None:
    report = {
        "install": [
            _meta("s3fs", "2026.9.0", "fsspec<2026.9.1,>=2026.9.0", "aiohttp>=3.9"),  # missing
            _meta("fsspec", "2026.9.0", "Pinned_Dep==0.3"),  # present, pinned tightly by s3fs
            _meta("pinned-dep", "0.3"),  # present, pinned by fsspec once fsspec is carried
            _meta("aiohttp", "3.14.5"),  # present, loosely required: stays the machine's
            _meta("Ray", "2.60.0", "click>=7"),  # missing
            _meta("click", "8.5.1"),  # present
        ]
    }
    present = {"fsspec", "pinned-dep", "aiohttp", "click"}
    assert gpu_pack.plan(report, present) == [
        ("Ray", "2.60.0"), ("fsspec", "2026.9.0"), ("pinned-dep", "0.3"), ("s3fs", "2026.9.0"),
    ]  # fmt: skip


def test_requirements_leave_out_the_machines_torch_s3_and_postgres(gpu_pack: ModuleType) -> None:
    names = {gpu_pack.norm(r.split("[")[0].split(">")[0].split("<")[0].split("=")[0]) for r in
             gpu_pack.requirements(REPO / "pyproject.toml")}  # fmt: skip
    assert {"torch", "torchvision", "s3fs", "psycopg"}.isdisjoint(names)
    assert {"ray", "fastapi", "pydantic", "sqlalchemy", "pytest", "pytest-timeout"} <= names


def test_the_device_package_list_holds_torch_and_not_ray(gpu_pack: ModuleType) -> None:
    present = gpu_pack.device_packages(REPO / "scripts/gpu-device-packages.txt")
    assert {"torch", "torchvision", "numpy", "pytest", "pytest-timeout"} <= present
    assert {"ray", "pydantic", "fastapi", "sqlalchemy"}.isdisjoint(present)


def _site(root: Path, ray: bool = True) -> Path:
    """A small installed tree; with `ray`, the parts of Ray's that the pack keeps and drops."""
    site = root / "site"
    files = {"hello_pack/__init__.py": "WHO = 'the pack'\n", "bin/hello": "#!/here/python\n"}
    ray_files = {
        "ray/jars/ray_dist.jar": "java",
        "ray/rllib/__init__.py": "",
        "ray/llm/__init__.py": "",
        "ray/dashboard/client/build/main.js": "js",
        "ray/dashboard/client/build/main.js.map": "map",
        "ray/core/src/ray/raylet/raylet": "#!/bin/sh\n",
    }
    for rel, text in {**files, **(ray_files if ray else {})}.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if ray:
        (site / "ray/core/src/ray/raylet/raylet").chmod(0o755)
    return site


def test_the_archive_drops_what_a_gpu_check_never_loads_and_keeps_modes(gpu_pack: ModuleType, tmp_path: Path) -> None:
    dest = tmp_path / "site-py312.tar.xz"
    gpu_pack.pack_site(_site(tmp_path), dest)
    with tarfile.open(dest) as tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
    assert set(members) == {"site/hello_pack/__init__.py", "site/ray/dashboard/client/build/main.js",
                            "site/ray/core/src/ray/raylet/raylet"}  # fmt: skip
    assert members["site/ray/core/src/ray/raylet/raylet"].mode & 0o111  # still executable


def _pack(gpu_pack: ModuleType, root: Path, version: tuple[int, int]) -> Path:
    pack = root / "pack"
    pack.mkdir()
    gpu_pack.pack_site(_site(root, ray=False), pack / f"site-py{version[0]}{version[1]}.tar.xz")
    (pack / "MANIFEST.txt").write_text(f"python {version[0]}.{version[1]}\nhello-pack==1.0\n")
    return pack


def test_the_installer_refuses_a_pack_for_another_python(gpu_pack: ModuleType, tmp_path: Path) -> None:
    pack = _pack(gpu_pack, tmp_path, (3, 9))
    done = subprocess.run(["bash", "scripts/gpu-pack-install.sh", sys.executable, str(pack), str(tmp_path / "s")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert f"is for Python 3.9, but {sys.executable} is 3.{sys.version_info[1]}" in done.stderr
    assert "--python-version 3." in done.stderr  # says how to rebuild it
    assert not (tmp_path / "s").exists()


@pytest.mark.timeout(120)
def test_the_installer_unpacks_a_pack_behind_the_repository(gpu_pack: ModuleType, tmp_path: Path) -> None:
    pack = _pack(gpu_pack, tmp_path, sys.version_info[:2])
    site = tmp_path / "s"
    done = subprocess.run(["bash", "scripts/gpu-pack-install.sh", sys.executable, str(pack), str(site)],
                          cwd=REPO, capture_output=True, text=True, timeout=110)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (site / "hello_pack/__init__.py").is_file() and not (site / "bin").exists()
    assert f"into {site}" in done.stdout and "torch " in done.stdout and "ray " in done.stdout
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{site}"}
    who = subprocess.run([sys.executable, "-c", "import hello_pack; print(hello_pack.WHO)"],
                         env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert who.stdout.strip() == "the pack"
