"""Virtual environments built the way the EMR bootstrap builds a node's: base dependencies only, no extras.

The dependency install is slow (pyspark alone is hundreds of MB), so it is cached under
.cache/venvs/<hash of requirements.lock + the base dependencies + Python version> and reused across pytest runs;
fruitpipe itself is reinstalled from the checkout (non-editable, as a wheel would be) every time it is asked for.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_CACHE = ROOT / ".cache" / "venvs"
COMPLETE_MARKER = ".fruitpipe-deps-complete"
# What a non-editable install of the checkout needs: the package and the files pyproject.toml names.
_PACKAGE_FILES = ("pyproject.toml", "README.md")


def base_dependencies(root: Path = ROOT) -> list[str]:
    """pyproject.toml's `dependencies`: what every executor (and an EMR node) installs, no extras."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return list(project["dependencies"])


def deps_key(root: Path = ROOT) -> str:
    """Names a dependency install: it changes when the lock, the base dependencies or the Python version do."""
    digest = hashlib.sha256((root / "requirements.lock").read_bytes())
    digest.update("\n".join(base_dependencies(root)).encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()[:16]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _pip(venv: Path, *args: str) -> None:
    command = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "-q", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def base_venv(root: Path = ROOT) -> Path:
    """A venv holding exactly the locked base dependencies, built once per deps_key and then reused."""
    return _built_once(VENV_CACHE / deps_key(root), ["-c", str(root / "requirements.lock"), *base_dependencies(root)])


def _built_once(venv: Path, pip_args: list[str]) -> Path:
    """`venv` with `pip install pip_args` done, unless a complete earlier build is there.

    Built in place under a file lock (a venv cannot be moved after creation); a marker written last tells a
    complete install from one cut short, which is removed and rebuilt.
    """
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with open(VENV_CACHE / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / COMPLETE_MARKER).is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(venv, *pip_args)
        (venv / COMPLETE_MARKER).write_text("\n".join(pip_args) + "\n")
    return venv


def install_checkout(venv: Path, root: Path = ROOT) -> None:
    """Install this checkout's fruitpipe into `venv`, non-editable and without dependencies, replacing any earlier.

    Built from a copy of the package files, so the build leaves nothing in the checkout others work in.
    """
    with tempfile.TemporaryDirectory(prefix="fruitpipe-src-") as work:
        source = Path(work) / "fruitpipe-src"
        source.mkdir()
        for name in _PACKAGE_FILES:
            shutil.copy2(root / name, source / name)
        shutil.copytree(root / "fruitpipe", source / "fruitpipe", ignore=shutil.ignore_patterns("__pycache__"))
        _pip(venv, "--no-deps", "--force-reinstall", str(source))


def node_venv(root: Path = ROOT) -> Path:
    """A base-dependency venv with the checkout's fruitpipe freshly installed: what an EMR node runs."""
    venv = base_venv(root)
    install_checkout(venv, root)
    return venv


def cached_venv(name: str, requirements: list[str]) -> Path:
    """A venv of a tool the tests run as a real program (e.g. the AWS CLI), built once per requirement set."""
    digest = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:16]
    return _built_once(VENV_CACHE / f"{name}-{digest}", requirements)
