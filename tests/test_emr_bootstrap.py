"""The generated EMR bootstrap script, run for real here: a fresh virtual environment gets the locked
executor dependencies and a freshly built fruitpipe wheel, then imports what the executors import.

Only the wheel's source differs from EMR: a local path (copied with cp) instead of s3:// (aws s3 cp).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from fruitpipe.cloud import bootstrap

EXECUTOR_IMPORTS = "numpy, pandas, pyarrow, onnxruntime, PIL, simplejpeg, fsspec, s3fs, yaml, fruitpipe"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("python3.11") is None, reason="EMR 7 nodes run python3.11; this machine has none")
def test_bootstrap_script_installs_an_environment_the_executors_can_use(tmp_path):
    root = bootstrap.project_root()
    wheel = bootstrap.build_wheel(root, tmp_path / "dist")
    pins = bootstrap.executor_pins(root)
    node = tmp_path / "node"
    script = tmp_path / "bootstrap.sh"
    script.write_text(bootstrap.render_bootstrap(pins, str(wheel), root=str(node)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}

    install = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=900, check=False)
    assert install.returncode == 0, install.stderr[-3000:]
    assert "fruitpipe installed" in install.stdout

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
