"""The local engine (a process pool instead of Spark, fruitpipe.distributors): auto's choice, the same outputs as
the Spark run, resume, bad images as error rows, task retries, and Ctrl-C or a killed driver stopping every
worker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from fruitpipe.config import build_config
from fruitpipe.distributors import ENGINE_ENV, LOCAL_MAX_IMAGES, LocalDistributor, choose_engine
from fruitpipe.errors import FruitpipeError
from fruitpipe.pipeline import run
from fruitpipe.run_folder import RunFolder
from fruitpipe.spark import TASK_RETRIES
from tests.support.compare import assert_pca_equal, vectors
from tests.support.processes import cli, session_members, snapshot, wait_until

SMALL = {"image_size": 96, "pca_k": 3, "shard_size": 8, "quiet": True}


def _config(**values):
    return build_config({}, {"source": "/data/in", "output": "/data/out", **values})


@pytest.mark.parametrize(("values", "listed", "engine"), [
    ({}, 600, "local"),
    ({"master": "local[2]"}, LOCAL_MAX_IMAGES, "local"),
    ({"master": "local[*]"}, LOCAL_MAX_IMAGES + 1, "spark"),
    ({"master": "spark://head-node:7077"}, 600, "spark"),
    ({"master": "yarn"}, 600, "spark"),
    ({"spark_conf": {"spark.driver.memory": "2g"}}, 600, "spark"),
    ({"engine": "spark"}, 600, "spark"),
    ({"engine": "local"}, 10 * LOCAL_MAX_IMAGES, "local"),
])
def test_auto_picks_the_local_pool_only_for_a_small_run_on_a_local_master(monkeypatch, values, listed, engine):
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    assert choose_engine(_config(**values), listed) == engine


def test_the_environment_replaces_autos_choice_and_a_conflict_is_one_line(monkeypatch):
    monkeypatch.setenv(ENGINE_ENV, "spark")
    assert choose_engine(_config(), 10) == "spark"
    assert choose_engine(_config(engine="local"), 10) == "local"
    monkeypatch.setenv(ENGINE_ENV, "local")
    assert choose_engine(_config(), 10 * LOCAL_MAX_IMAGES) == "local"
    with pytest.raises(FruitpipeError, match="local engine runs on this machine only, not on master spark://h:7077"):
        choose_engine(_config(master="spark://h:7077"), 10)
    monkeypatch.setenv(ENGINE_ENV, "dask")
    with pytest.raises(FruitpipeError, match=f"{ENGINE_ENV} must be one of spark, local"):
        choose_engine(_config(), 10)
    monkeypatch.delenv(ENGINE_ENV)
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "40001")  # started by spark-submit: its master, never a local pool
    assert choose_engine(_config(), 10) == "spark"


@pytest.fixture(scope="module")
def local_run(finished_run, tmp_path_factory):
    """conftest's Spark run again, on the local engine."""
    values = yaml.safe_load(RunFolder.finished(finished_run.output).config_text())
    values = {key: value for key, value in values.items() if value is not None}
    output = tmp_path_factory.mktemp("local-runs") / "demo-run"
    return run(build_config({}, {**values, "output": str(output), "engine": "local", "overwrite": False}))


def test_the_local_engine_writes_what_spark_writes(local_run, finished_run):
    ours, theirs = local_run.features().sort_values("image_id"), finished_run.features().sort_values("image_id")
    assert list(ours["image_id"]) == list(theirs["image_id"]) and len(ours) == finished_run.images_ok
    np.testing.assert_allclose(vectors(ours, "features"), vectors(theirs, "features"), atol=1e-5)
    assert_pca_equal(local_run.pca(), finished_run.pca(), atol=1e-4)
    for table in (local_run.metadata, local_run.errors):
        frame, spark_frame = table(), getattr(finished_run, table.__name__)()
        assert frame.sort_values("path").reset_index(drop=True).equals(
            spark_frame.sort_values("path").reset_index(drop=True))
    ours_folder, theirs_folder = RunFolder(local_run.output), RunFolder(finished_run.output)
    assert ours_folder.finished_shards() == theirs_folder.finished_shards()
    for shard_id in theirs_folder.finished_shards():
        local, spark = ours_folder.shard_stats(shard_id), theirs_folder.shard_stats(shard_id)
        same = ("images", "ok", "failed", "retryable", "feature_dim", "images_sha256")
        assert [getattr(local, name) for name in same] == [getattr(spark, name) for name in same]
        assert local.runtime["runtime"] == spark.runtime["runtime"]
    info, spark_info = ours_folder.model_info(), theirs_folder.model_info()
    assert info["engine"]["engine"] == "local" and info["engine"]["workers"] >= 1 and local_run.spark_master == ""
    assert spark_info["engine"]["engine"] == "spark" and spark_info["engine"]["master"].startswith("local[")
    assert info["engine"]["pca_stages"] == spark_info["engine"]["pca_stages"] == "driver"
    assert info["counts"] == spark_info["counts"]


def test_the_local_engine_resumes_and_writes_a_bad_image_as_an_error_row(demo_root, cache_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(demo_root / "Training", source / "Training")
    (source / "Training" / "Banana" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    config = build_config({}, {"source": str(source), "output": str(out), "cache_dir": cache_dir,
                               "engine": "local", **SMALL})
    first = run(config)
    errors = first.errors()
    assert list(errors["path"]) == ["Training/Banana/broken.jpg"] and list(errors["stage"]) == ["decode"]
    assert first.images_ok == 72 and first.images_failed == 1 and first.images_listed == 73
    assert first.metadata().set_index("path").loc["Training/Banana/broken.jpg", "status"] == "failed"

    stats = {int(p.stem[5:]): json.loads(p.read_text())["finished_at"] for p in (out / "_shards").glob("*.json")}
    (out / "_shards" / "part-00001.json").unlink()
    torn = out / "features" / "part-00002.parquet"
    torn.write_bytes(torn.read_bytes()[:-64])
    again = run(config)
    after = {int(p.stem[5:]): json.loads(p.read_text())["finished_at"] for p in (out / "_shards").glob("*.json")}
    assert again.shards_resumed == again.shards_total - 2
    assert {shard for shard in stats if after[shard] != stats[shard]} == {1, 2}
    assert (again.images_ok, again.images_failed, again.images_listed) == (72, 1, 73)
    redone = again.features().sort_values("image_id")
    np.testing.assert_allclose(vectors(redone, "features"),
                               vectors(first.features().sort_values("image_id"), "features"), atol=1e-6)
    assert again.errors().equals(errors)


def _attempted(marks: Path, item: str) -> int:
    """Records one more attempt at `item`; returns how many there have been."""
    with open(marks / item, "a") as handle:
        handle.write(".")
    return (marks / item).stat().st_size


def _flaky(item: str, marks: Path) -> str:
    attempts = _attempted(marks, item)
    if item == "fails once" and attempts == 1:
        raise OSError("a blip")
    if item == "kills its worker once" and attempts == 1:
        os._exit(1)
    if item == "always fails":
        raise ValueError(f"attempt {attempts} failed")
    return item.upper()


def test_the_pool_retries_a_failed_task_outlives_a_dead_worker_and_stops_after_the_last_attempt(tmp_path):
    from functools import partial

    items = ["fails once", "kills its worker once", "fine"]
    with LocalDistributor(2) as pool:
        assert pool.map(partial(_flaky, marks=tmp_path), items) == [item.upper() for item in items]
        assert pool.map(len, ["again", "on the same pool"]) == [5, 16]
        with pytest.raises(ValueError, match=f"attempt {TASK_RETRIES} failed"):
            pool.map(partial(_flaky, marks=tmp_path), ["always fails"])
    assert (tmp_path / "always fails").stat().st_size == TASK_RETRIES


def test_a_script_without_a_main_guard_runs_its_top_level_once(tmp_path):
    """The workers never import the driver's __main__: a script calling fruitpipe at its top level, as the README's
    Python example does, is not run again in every worker."""
    script = tmp_path / "script.py"
    script.write_text("from fruitpipe.distributors import LocalDistributor\n"
                      "print('top level', flush=True)\n"
                      "with LocalDistributor(2) as pool:\n"
                      "    print(pool.map(abs, [-1, -2, -3]))\n")
    finished = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.splitlines() == ["top level", "[1, 2, 3]"]


def _started_run(demo_root, cache_dir, out: Path) -> subprocess.Popen:
    """`fruitpipe run` on the local engine in its own session, once its first shard is written."""
    process = subprocess.Popen(cli("run", str(demo_root), str(out), "--cache-dir", cache_dir, "--limit", "96",
                                   "--shard-size", "2", "--pca-k", "3", "--quiet"),
                               env={**os.environ, ENGINE_ENV: "local"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_until(lambda: (out / "_shards").is_dir() or process.poll() is not None, 120, "a shard to finish")
    assert process.poll() is None, process.communicate()[1][-3000:]
    return process


@pytest.mark.parametrize("stop", ["ctrl-c", "kill -9 the driver"])
def test_stopping_the_driver_stops_every_worker(demo_root, cache_dir, tmp_path, stop):
    out = tmp_path / "out"
    process = _started_run(demo_root, cache_dir, out)
    try:
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 130
            assert stderr.strip() == "fruitpipe: interrupted; run the same command again to resume"
        else:
            os.kill(process.pid, signal.SIGKILL)
            process.communicate(timeout=60)
        wait_until(lambda: not session_members(process.pid), 10, "every worker to end")
        before = snapshot(out)
        time.sleep(1.0)
        assert snapshot(out) == before and not (out / "manifest.json").exists()
    finally:
        if session_members(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
