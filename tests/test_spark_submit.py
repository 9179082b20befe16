"""`spark-submit … fruitpipe/cli.py run …`: with no `--master` of its own, fruitpipe keeps spark-submit's master."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyspark
import pytest

import fruitpipe.cli

pytestmark = pytest.mark.spark


def test_spark_submit_master_is_kept_when_fruitpipe_is_given_none(demo_root, cache_dir, tmp_path):
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    output = tmp_path / "run"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    env.pop("SPARK_HOME", None)
    done = subprocess.run([str(spark_submit), "--master", "local[1]", fruitpipe.cli.__file__, "run", str(demo_root),
                           str(output), "--limit", "12", "--pca-k", "4", "--cache-dir", cache_dir, "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    info = json.loads((output / "model_info" / "model_info.json").read_text())
    assert info["spark_master"] == "local[1]"
    assert info["counts"]["images_ok"] == 12
