"""The EMR bootstrap script, generated from the project's own pins so every node runs what the tests ran.

Each node gets a Python 3.11 virtual environment at NODE_ROOT/venv with the executor dependencies at the
versions in requirements.lock, then the fruitpipe wheel without dependencies: pyspark comes with EMR and
must not be replaced by a pip copy. For nodes without internet access, :func:`pack_wheelhouse` downloads those
wheels once, for the nodes' platform, and the script installs from them with no package index.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fruitpipe.errors import FruitpipeError

from .specs import NODE_LAUNCHER, NODE_ROOT

# Dependencies EMR itself provides on every node.
PROVIDED_BY_EMR = frozenset({"pyspark"})
_IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml", "opencv-python-headless": "cv2", "faiss-cpu": "faiss"}
_WHEEL_NAME = re.compile(r"^[A-Za-z0-9_.+-]+\.whl$")
_WHEELHOUSE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+\.tar$")
WHEELHOUSE_NAME = "wheelhouse.tar"
# EMR 7.x and emr-spark-8 nodes run Amazon Linux 2023 on x86_64 (m5, c5, r5) with glibc 2.34, so every manylinux
# wheel up to manylinux_2_34 runs there. pip does not widen an explicit --platform to older glibc versions,
# so each is listed, newest first, as pip would rank them on the node itself.
NODE_PYTHON_VERSION = "3.11"
NODE_PLATFORMS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(34, 16, -1)), "manylinux2014_x86_64")
# Files of the checkout that go into the build; build/ leftovers and virtual environments stay out.
_BUILD_FILES = ("pyproject.toml", "setup.py", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE")

LAUNCHER = """\
import sys

from fruitpipe.cli import main

sys.exit(main())
"""


@dataclass(frozen=True)
class Pins:
    """What the nodes install: exact executor requirements plus the full lock as pip constraints."""

    requirements: tuple[str, ...]
    constraints: str
    imports: tuple[str, ...]


def normalize(name: str) -> str:
    """PEP 503 project-name normalization, so PyYAML, pyyaml and py_yaml compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_root() -> Path:
    """The source checkout holding pyproject.toml and requirements.lock (uploading needs one)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "pyproject.toml").is_file() or not (root / "requirements.lock").is_file():
        raise FruitpipeError(f"{root} is not a fruitpipe source checkout (no pyproject.toml and requirements.lock "
                             "next to the fruitpipe package); run `fruitpipe emr upload` from a checkout")
    return root


def executor_pins(root: Path) -> Pins:
    """Pins every `dependencies` entry of pyproject.toml (except what EMR provides) to its version in the lock."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lock_text = (root / "requirements.lock").read_text(encoding="utf-8")
    locked: dict[str, str] = {}
    for line in lock_text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            locked[normalize(name)] = version.strip()
    requirements, imports = [], []
    for spec in project["dependencies"]:
        name = normalize(re.split(r"[\s<>=!~;\[(]", spec, maxsplit=1)[0])
        if name in PROVIDED_BY_EMR:
            continue
        if name not in locked:
            raise FruitpipeError(f"requirements.lock has no pin for {name}, which the executors need; "
                                 "regenerate the lock")
        requirements.append(f"{name}=={locked[name]}")
        imports.append(_IMPORT_NAMES.get(name, name.replace("-", "_")))
    return Pins(tuple(requirements), lock_text, tuple(imports))


def render_bootstrap(pins: Pins, wheel_source: str, *, wheelhouse_source: str | None = None, root: str = NODE_ROOT,
                     python: str = "python3.11") -> str:
    """The bootstrap script. ``wheel_source`` is an s3:// URI (copied with the AWS CLI) or a local path.

    With ``wheelhouse_source`` (a .tar from :func:`pack_wheelhouse`, s3:// or local, fetched the same way) the
    dependencies are installed from it with --no-index, so the node never contacts a package index.
    """
    wheel_name = _file_name(wheel_source, _WHEEL_NAME, "a wheel (.whl) file")
    launcher = root + NODE_LAUNCHER[len(NODE_ROOT):]
    q = shlex.quote
    if wheelhouse_source is None:
        sources = ""
        index = ""
    else:
        _file_name(wheelhouse_source, _WHEELHOUSE_NAME, "a wheelhouse (.tar) file")
        sources = f"""
# Offline install: every dependency comes from the packed wheelhouse, never from a package index.
{_fetch(wheelhouse_source)} {q(wheelhouse_source)} "$ROOT/{WHEELHOUSE_NAME}"
rm -rf "$ROOT/wheelhouse" && mkdir -p "$ROOT/wheelhouse"
tar -xf "$ROOT/{WHEELHOUSE_NAME}" -C "$ROOT/wheelhouse"
"""
        index = '--no-index --find-links "$ROOT/wheelhouse" '
    return f"""#!/usr/bin/env bash
# Installs fruitpipe on an EMR node. Generated by `fruitpipe emr upload` from requirements.lock: do not edit.
set -euo pipefail

ROOT={q(root)}
PYTHON={q(python)}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  $SUDO dnf install -y -q python3.11 python3.11-pip
fi
$SUDO mkdir -p "$ROOT"
$SUDO chown "$(id -u):$(id -g)" "$ROOT"
"$PYTHON" -m venv "$ROOT/venv"

cat > "$ROOT/constraints.txt" <<'FRUITPIPE_CONSTRAINTS'
{pins.constraints.rstrip()}
FRUITPIPE_CONSTRAINTS
{sources}"$ROOT/venv/bin/python" -m pip install --quiet --disable-pip-version-check {index}-c "$ROOT/constraints.txt" \\
  {' '.join(q(r) for r in pins.requirements)}

{_fetch(wheel_source)} {q(wheel_source)} "$ROOT/{wheel_name}"
"$ROOT/venv/bin/python" -m pip install --quiet --disable-pip-version-check {index}--no-deps "$ROOT/{wheel_name}"

cat > {q(launcher)} <<'FRUITPIPE_LAUNCHER'
{LAUNCHER.rstrip()}
FRUITPIPE_LAUNCHER

"$ROOT/venv/bin/python" -c {q("import " + ", ".join((*pins.imports, "fruitpipe")))}
echo "fruitpipe installed in $ROOT/venv"
"""


def _file_name(source: str, pattern: re.Pattern[str], what: str) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1]
    if not pattern.match(name):
        raise FruitpipeError(f"{source} is not {what}")
    return name


def _fetch(source: str) -> str:
    return "aws s3 cp --only-show-errors" if source.startswith("s3://") else "cp"


def wheelhouse_command(pins: Pins, constraints: Path, dest: Path,
                       platforms: tuple[str, ...] | None = NODE_PLATFORMS) -> list[str]:
    """`pip download` of the executor pins as binary wheels for the nodes' CPython 3.11 and ``platforms``.

    ``platforms=None`` targets this machine's platform (tests run the offline install here).
    """
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", NODE_PYTHON_VERSION, "--implementation", "cp",
               "-c", str(constraints), "--dest", str(dest)]
    for platform in platforms or ():
        command += ["--platform", platform]
    return [*command, *pins.requirements]


def pack_wheelhouse(pins: Pins, dest: Path, platforms: tuple[str, ...] | None = NODE_PLATFORMS) -> Path:
    """Downloads every wheel the nodes install (pins plus their locked dependencies) into one tar in ``dest``.

    A tar is one S3 object: the node fetches it in one request and cannot see half an upload.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fruitpipe-wheelhouse-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(pins.constraints, encoding="utf-8")
        wheels = Path(tmp) / "wheels"
        result = subprocess.run(wheelhouse_command(pins, constraints, wheels, platforms),
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise FruitpipeError(f"downloading the node wheels failed ({detail}); `emr upload --offline` needs "
                                 "PyPI (or your pip index) reachable from this machine")
        archive = dest / WHEELHOUSE_NAME
        with tarfile.open(archive, "w") as tar:
            for wheel in sorted(wheels.glob("*.whl")):
                tar.add(wheel, arcname=wheel.name)
    return archive


def build_wheel(root: Path, dest: Path) -> Path:
    """Builds the fruitpipe wheel into ``dest`` from a clean copy of the checkout, offline.

    Copying first keeps setuptools' build/ directory (which can carry deleted modules into a wheel) out of
    the working tree; --no-build-isolation uses the setuptools already installed instead of downloading one.
    """
    with tempfile.TemporaryDirectory(prefix="fruitpipe-wheel-") as tmp:
        source = Path(tmp) / "source"
        shutil.copytree(root / "fruitpipe", source / "fruitpipe",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for name in _BUILD_FILES:
            if (root / name).is_file():
                shutil.copy2(root / name, source / name)
        dest.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
             "--disable-pip-version-check", "--wheel-dir", str(dest), str(source)],
            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FruitpipeError(f"building the fruitpipe wheel failed ({detail}); pip needs setuptools and wheel "
                             "installed, or pass --wheel PATH")
    wheels = sorted(dest.glob("fruitpipe-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise FruitpipeError(f"pip reported success but left no fruitpipe wheel in {dest}")
    return wheels[-1]
