"""The generated EMR bootstrap script, run for real here: a fresh virtual environment gets the locked
executor dependencies and a freshly built fruitpipe wheel, then imports what the executors import.

Only the sources differ from EMR: local paths (copied with cp) instead of s3:// (aws s3 cp).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fruitpipe.cloud import bootstrap

EXECUTOR_IMPORTS = "numpy, pandas, pyarrow, onnxruntime, PIL, simplejpeg, fsspec, s3fs, yaml, fruitpipe"

needs_python311 = pytest.mark.skipif(shutil.which("python3.11") is None,
                                     reason="EMR 7 nodes run python3.11; this machine has none")


def run_bootstrap(tmp_path: Path, script: str, env: dict[str, str]) -> None:
    path = tmp_path / "bootstrap.sh"
    path.write_text(script)
    install = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900, check=False)
    assert install.returncode == 0, install.stderr[-3000:]
    assert "fruitpipe installed" in install.stdout


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


@pytest.mark.slow
@needs_python311
def test_bootstrap_script_installs_an_environment_the_executors_can_use(tmp_path):
    root = bootstrap.project_root()
    wheel = bootstrap.build_wheel(root, tmp_path / "dist")
    pins = bootstrap.executor_pins(root)
    node = tmp_path / "node"
    env = clean_env()
    run_bootstrap(tmp_path, bootstrap.render_bootstrap(pins, str(wheel), root=str(node)), env)

    probe = (f"import {EXECUTOR_IMPORTS}, importlib.util, importlib.metadata as m; "
             "print(fruitpipe.__file__); print(importlib.util.find_spec('pyspark')); "
             "print(' '.join(f'{d}=={m.version(d)}' for d in " + repr([r.split("==")[0] for r in pins.requirements])
             + "))")
    result = subprocess.run([str(node / "venv" / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    module_file, pyspark_spec, versions = result.stdout.strip().splitlines()
    assert module_file.startswith(str(node / "venv"))
    assert pyspark_spec == "None"
    assert sorted(v.lower() for v in versions.split()) == sorted(r.lower() for r in pins.requirements)
    assert (node / "launch.py").read_text() == bootstrap.LAUNCHER


@pytest.mark.slow
@needs_python311
def test_offline_bootstrap_installs_from_the_wheelhouse_without_any_index(tmp_path):
    root = bootstrap.project_root()
    pins = bootstrap.executor_pins(root)
    dist = tmp_path / "dist"
    wheel = bootstrap.build_wheel(root, dist)
    # Packed for this machine's platform (the nodes' manylinux set needs the same pip download, from PyPI).
    wheelhouse = bootstrap.pack_wheelhouse(pins, dist, platforms=None)
    node = tmp_path / "node"
    # Any index request would fail: pip is told there is none, and the one it might still try does not answer.
    env = {**clean_env(), "PIP_NO_INDEX": "1", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": ""}
    script = bootstrap.render_bootstrap(pins, str(wheel), wheelhouse_source=str(wheelhouse), root=str(node))
    run_bootstrap(tmp_path, script, env)

    probe = (f"import {EXECUTOR_IMPORTS}, importlib.util; print(fruitpipe.__file__); "
             "print(importlib.util.find_spec('torch')); print(importlib.util.find_spec('pyspark'))")
    result = subprocess.run([str(node / "venv" / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    module_file, torch_spec, pyspark_spec = result.stdout.strip().splitlines()
    assert module_file.startswith(str(node / "venv"))
    assert torch_spec == "None" and pyspark_spec == "None"
    assert any((node / "wheelhouse").glob("numpy-*.whl"))
