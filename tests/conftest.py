"""Shared fixtures: a generated demo dataset, one Spark session for the whole test run, one finished run, and a
moto S3 server per test module with the test process pointed at it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# The suite's runs are small and local, which `--engine auto` would give to the local process pool; most tests are
# about Spark (pipeline, resume, faults, cluster, S3, spark-submit), so auto means spark here, in this process and
# in every `fruitpipe` it starts. tests/test_local_engine.py runs the local engine by name (fruitpipe.distributors).
os.environ["FRUITPIPE_ENGINE"] = "spark"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """6 classes x 12 training images (+ test images), Fruits-360 layout."""
    from tests.support.images import demo_dataset

    return demo_dataset(tmp_path_factory, "demo", per_class=12, seed=0)


@pytest.fixture(scope="session")
def spark():
    """One local Spark session shared by every test: fruitpipe reuses an active session and never stops it."""
    from fruitpipe.spark import spark_session

    with spark_session("local[2]", {}) as session:
        yield session


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    """Exported ONNX models are cached here once per test run."""
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def finished_run(demo_root, spark, cache_dir, tmp_path_factory):
    """A complete efficientnet_lite0 run over the demo Training split."""
    from fruitpipe.config import build_config
    from fruitpipe.pipeline import run

    output = tmp_path_factory.mktemp("runs") / "demo-run"
    config = build_config({}, {"source": str(demo_root), "output": str(output), "pca_k": 10, "shard_size": 20,
                               "cache_dir": cache_dir, "quiet": True, "features_csv": True})
    return run(config)


@pytest.fixture(scope="module")
def moto():
    """A moto server on loopback for the module's tests (they keep apart by bucket name)."""
    from tests.support.moto_server import MotoServer

    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_process_env(moto, monkeypatch) -> None:
    """This test process pointed at `moto` the way a user's shell would be (for in-process storage and CLI calls)."""
    from tests.support.s3 import s3_environment

    for name, value in s3_environment(moto).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
