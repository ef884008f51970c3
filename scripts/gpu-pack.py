#!/usr/bin/env python3
"""Build `.gpu-pack/`: what a GPU machine with no package index needs to run `scripts/gpu-check.sh`.

The lent GPU machine has a python3 with a CUDA build of torch but reaches no index, and what travels
to it (the working tree plus carried folders) is capped at 64 MiB. So, here, where pip reaches an
index:

1. resolve the project's runtime dependencies (pyproject.toml, less torch and torchvision: the
   machine's CUDA build is used; less s3fs and psycopg, LEAVE_OUT: the check uses neither S3 nor
   PostgreSQL) plus pytest and pytest-timeout, for the machine's Python, binary wheels only;
2. keep the packages the machine's image lacks (`scripts/gpu-device-packages.txt`), and those it
   has that a kept one pins tightly (its own version might not do);
3. install them (`pip install --no-deps --target`, for the machine's platform) into one folder, drop
   what a GPU check never loads (Ray's Java jars, RLlib and ray.llm, the dashboard's source maps, the
   console scripts) and store that folder as `.gpu-pack/site-py312.tar.xz`: about 44 MiB, where
   the wheels alone are over 80 (Ray's is 79 MB); tar keeps the binaries' modes.

`scripts/gpu-check.sh` unpacks it into a temporary folder put on PYTHONPATH behind the repository
when `.gpu-pack/` exists, and runs the machine's python3 (`BASE_PYTHON` to choose another). Usage:

    python3 scripts/gpu-pack.py                      # for the H200 machine's Python 3.12 (3 min)
    python3 scripts/gpu-pack.py --python-version 3.11 --out /tmp/pack   # another Python

then name `.gpu-pack` in the device tool's `carry`. `.gpu-pack/` is ignored by git.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
MACHINE_TORCH = ("torch", "torchvision")  # the machine's CUDA build, never carried
# Runtime dependencies the check never loads, left out to stay under the size cap: S3 storage (the
# check writes to local disk; botocore alone is 16 MB) and PostgreSQL (its store is SQLite).
LEAVE_OUT = ("s3fs", "psycopg")
CHECK_EXTRAS = ("pytest>=8", "pytest-timeout>=2.3")  # what the check needs of the dev extra
# Parts of Ray a GPU check never imports: the Java worker's jars, RLlib, ray.llm, and the source maps
# of the dashboard's JavaScript (the dashboard itself is kept: `cdsp run --ray` starts it).
DROP = (re.compile(r"^ray/jars/"), re.compile(r"^ray/rllib/"), re.compile(r"^ray/llm/"), re.compile(r"\.map$"))
LIMIT_MIB = 56  # of the device tool's 64 MiB for everything that travels; the rest is the repository


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path) -> list[str]:
    """The project's runtime requirements without the machine's torch, plus what the check runs."""
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    keep = [d for d in deps if norm(re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0]) not in (*MACHINE_TORCH, *LEAVE_OUT)]
    return [*keep, *CHECK_EXTRAS]


def device_packages(path: Path) -> set[str]:
    return {norm(line.strip()) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}


def release(version: str | None) -> tuple[int, int] | None:
    """(major, minor) of a version's release ("2026.9.1" -> (2026, 9); "3" -> (3, 0))."""
    m = re.match(r"(\d+)(?:\.(\d+))?", version or "")
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def tight_pins(requires_dist: list[str]) -> set[str]:
    """Names that a package's requirements (extras' left out) pin to one version or one minor release
    series: `==X`, or `>=X,<Y` with Y at most the minor release after X's (s3fs asks for
    `fsspec>=2026.9.0,<2026.9.1`; `>=1.4,<1.5` is tight too, `>=1.25,<3` is not).
    The machine's image may hold another version of such a package; looser bounds it will meet."""
    pinned = set()
    for req in requires_dist:
        spec, _, marker = req.partition(";")
        if "extra ==" in marker:
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^)]*)\)?", spec)
        if not m:
            continue
        clauses = dict(re.findall(r"(===|==|!=|<=|>=|~=|<|>)\s*([^,\s]+)", m.group(2)))
        low, high = release(clauses.get(">=") or clauses.get(">")), release(clauses.get("<"))
        if "==" in clauses or (low and high and high[:2] <= (low[0], low[1] + 1)):
            pinned.add(norm(m.group(1)))
    return pinned


def plan(report: dict, present: set[str]) -> list[tuple[str, str]]:
    """(name, version) of every resolved package to carry: those the machine lacks, and those it has
    that a carried one pins tightly (its own version might not do)."""
    resolved = {norm(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    carry = {n for n in resolved if n not in present}
    grown = True
    while grown:
        pins = set().union(*(tight_pins(resolved[n].get("requires_dist") or []) for n in carry))
        grown = bool(pins & resolved.keys() - carry)
        carry |= pins & resolved.keys()
    return sorted((resolved[n]["name"], resolved[n]["version"]) for n in carry)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def target_options(python_version: str) -> list[str]:
    abi = "cp" + python_version.replace(".", "")
    opts = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp", "--abi", abi]
    for platform in PLATFORMS:
        opts += ["--platform", platform]
    return opts


def pack_site(site: Path, dest: Path) -> None:
    """The installed tree, less DROP and the console scripts (their shebangs name this machine's
    Python), as one tar.xz; xz shrinks the pure-Python and data files that wheels store deflated."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        rel = info.name.split("/", 1)[1] if "/" in info.name else ""
        return None if rel == "bin" or rel.startswith("bin/") or any(p.search(rel) for p in DROP) else info

    with tarfile.open(dest, "w:xz", preset=6) as tf:
        tf.add(site, arcname="site", filter=keep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / ".gpu-pack", help="the pack's folder (replaced)")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    ap.add_argument("--device-packages", type=Path, default=REPO / "scripts/gpu-device-packages.txt",
                    help="names of the packages the machine's image already holds")  # fmt: skip
    args = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        ap.error(f"--python-version: expected 3.N, got {args.python_version!r}")
    if not args.device_packages.is_file():
        ap.error(f"--device-packages: no such file: {args.device_packages}")
    present = device_packages(args.device_packages)
    reqs = requirements(REPO / "pyproject.toml")
    opts = target_options(args.python_version)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        report, wheels, site = Path(tmp) / "report.json", Path(tmp) / "wheels", Path(tmp) / "site"
        print(f"resolving {len(reqs)} requirements for CPython {args.python_version} ({PLATFORMS[0]})", flush=True)
        pip("install", "--quiet", "--dry-run", "--ignore-installed", "--target", str(site), *opts,
            "--report", str(report), *reqs)  # fmt: skip
        carry = plan(json.loads(report.read_text()), present)
        print(f"carrying {len(carry)} packages the machine lacks: " + ", ".join(f"{n}=={v}" for n, v in carry))
        pip("download", "--quiet", "--no-deps", *opts, "-d", str(wheels), *(f"{n}=={v}" for n, v in carry))
        pip("install", "--quiet", "--no-deps", "--no-compile", "--no-index", "--target", str(site), *opts,
            *map(str, sorted(wheels.glob("*.whl"))))  # fmt: skip
        tag = "py" + args.python_version.replace(".", "")
        pack_site(site, args.out / f"site-{tag}.tar.xz")
    (args.out / "MANIFEST.txt").write_text(
        f"python {args.python_version}\n" + "".join(f"{n}=={v}\n" for n, v in carry)
    )  # fmt: skip
    total = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{args.out}: {total / 2**20:.1f} MiB ({len(carry)} packages; left out of Ray: "
          f"{', '.join(p.pattern for p in DROP)})")  # fmt: skip
    if total > LIMIT_MIB * 2**20:
        print(f"error: the pack is {total / 2**20:.1f} MiB, over {LIMIT_MIB} MiB: it would not travel with the "
              "repository (64 MiB in all)", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
