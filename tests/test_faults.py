"""Faults survived: the driver killed at random moments and resumed, a Python worker killed mid-task and retried by
Spark, and bad configuration refused with one line on stderr, exit 2 and nothing written."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fruitpipe import pipeline
from fruitpipe.cli import main
from fruitpipe.config import build_config
from fruitpipe.pipeline import run
from tests.support.images import demo_dataset
from tests.support.processes import blocked_opening_a_fifo as _blocked_opening_a_fifo
from tests.support.processes import cli as _cli
from tests.support.processes import session_members as _session_members
from tests.support.processes import snapshot as _snapshot
from tests.support.processes import wait_until as _wait_until

pytestmark = pytest.mark.spark

KILL_SETTINGS = ["--image-size", "96", "--pca-k", "5", "--shard-size", "16", "--batch-size", "8"]
SHARDS = 15  # 240 images in shards of 16


def _done_shards(out: Path) -> int:
    return len(list((out / "_shards").glob("part-*.json"))) if (out / "_shards").is_dir() else 0


@pytest.fixture(scope="module")
def kill_source(tmp_path_factory) -> Path:
    """6 classes x 40 training images: 15 shards of 16."""
    return demo_dataset(tmp_path_factory, "kill-source", per_class=40, seed=3)


@pytest.fixture(scope="module")
def uninterrupted(kill_source, spark, cache_dir, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    output = tmp_path_factory.mktemp("kill-reference") / "out"
    assert main(["run", str(kill_source), str(output), *KILL_SETTINGS, "--cache-dir", cache_dir, "--quiet"]) == 0
    return output


def _kill_at(process: subprocess.Popen, out: Path, moment: tuple[int, int] | str, rng: random.Random,
             done_before: int) -> None:
    """Wait for a seeded moment of the run: early start-up (before its first shard), a number of shards done drawn
    from (low, high), or all shards done (the run is then fitting the PCA or writing outputs). Every moment but
    start-up waits until this run itself has done a shard, or (all shards done before it) has started its Spark
    JVM: a fast earlier attempt must not let a kill land before this one's Spark has started."""
    if moment == "startup":
        started, delay = time.monotonic(), rng.uniform(0.5, 6.0)
        _wait_until(lambda: time.monotonic() - started > delay or _done_shards(out) > done_before
                    or process.poll() is not None, 60, "start-up")
    elif done_before >= SHARDS:
        _wait_until(lambda: len(_session_members(process.pid)) >= 2 or process.poll() is not None, 240,
                    "the Spark JVM of a run with every shard done")
    else:
        target = SHARDS if moment == "finish" else max(rng.randint(*moment), done_before + 1)
        _wait_until(lambda: _done_shards(out) >= target or process.poll() is not None, 240, f"{target} shards")
        # All shards done, the driver fits the PCA and writes the outputs: under a second for this run's 240 images.
        time.sleep(rng.uniform(0.0, 0.3 if moment == "finish" else 0.4))
    assert process.poll() is None, f"the run ended by itself (exit {process.returncode}) before the {moment} kill"


def _kill_and_resume(source: Path, out: Path, cache_dir: str, moments: list, seed: int) -> list[int]:
    """Kill `fruitpipe run` at each moment, alternately the driver alone and its process group (driver and JVM);
    check that no process of its session survives and nothing writes on; then run the same command to the end.
    Returns the shards done at each kill."""
    rng = random.Random(seed)
    command = _cli("run", str(source), str(out), *KILL_SETTINGS, "--cache-dir", cache_dir)
    done_at_kill = []
    for number, moment in enumerate(moments):
        done_before = _done_shards(out)
        process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            _kill_at(process, out, moment, rng, done_before)
            done_at_kill.append(_done_shards(out))
            running = _session_members(process.pid)
            # Python workers run while shards are extracted; once all are done (the PCA of a run this small runs in
            # the driver, fruitpipe.distributors) the driver and its JVM remain.
            extracting = moment != "finish" and done_before < SHARDS
            if moment != "startup":
                expected = "driver, JVM, PySpark daemon and workers" if extracting else "driver and JVM"
                assert len(running) >= (4 if extracting else 2), f"expected {expected}, found {running}"
            if number % 2 == 0:
                os.kill(process.pid, signal.SIGKILL)
            else:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
            _wait_until(lambda: not _session_members(process.pid), 30, "the driver's Spark JVM and Python workers "
                        "to exit", poll_s=0.2)
            before = _snapshot(out)
            time.sleep(1.0)
            assert _snapshot(out) == before, "something kept writing after the run was killed"
        finally:
            for pid in _session_members(process.pid):
                os.kill(pid, signal.SIGKILL)
    assert not (out / "manifest.json").exists(), "a killed run must not look finished"
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    return done_at_kill


def _vectors(folder: Path, directory: str, column: str) -> tuple[list[str], np.ndarray]:
    frame = pd.read_parquet(folder / directory).sort_values("image_id")
    return list(frame["image_id"]), np.stack(frame[column].to_numpy()).astype(np.float64)


def _assert_same_as_uninterrupted(out: Path, reference: Path) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images_listed"] == manifest["images_ok"] + manifest["images_failed"] == 240
    assert manifest["shards_resumed"] > 0
    ids, features = _vectors(out, "features", "features")
    reference_ids, reference_features = _vectors(reference, "features", "features")
    assert ids == reference_ids and len(set(ids)) == 240
    np.testing.assert_allclose(features, reference_features, atol=1e-6)
    pca_ids, pca = _vectors(out, "pca", "pca")
    assert pca_ids == reference_ids
    np.testing.assert_allclose(pca, _vectors(reference, "pca", "pca")[1], atol=1e-5)
    metadata = pd.read_parquet(out / "metadata")
    assert len(metadata) == metadata["image_id"].nunique() == 240
    assert not list(out.rglob("*.tmp"))


def test_driver_killed_twice_then_resumed_equals_an_uninterrupted_run(kill_source, uninterrupted, cache_dir,
                                                                       tmp_path):
    out = tmp_path / "out"
    done_at_kill = _kill_and_resume(kill_source, out, cache_dir, [(1, 7), "finish"], seed=11)
    assert 0 < done_at_kill[0] < SHARDS and done_at_kill[1] == SHARDS, done_at_kill
    _assert_same_as_uninterrupted(out, uninterrupted)


@pytest.mark.slow
def test_driver_killed_five_times_then_resumed_equals_an_uninterrupted_run(kill_source, uninterrupted, cache_dir,
                                                                           tmp_path):
    out = tmp_path / "out"
    done_at_kill = _kill_and_resume(kill_source, out, cache_dir, ["startup", (1, 4), (5, 9), (10, 13), "finish"],
                                    seed=5)
    assert done_at_kill == sorted(done_at_kill) and done_at_kill[0] < done_at_kill[-1] == SHARDS, done_at_kill
    _assert_same_as_uninterrupted(out, uninterrupted)


def test_a_python_worker_killed_mid_task_is_retried_by_spark(demo_root, spark, cache_dir, tmp_path, monkeypatch):
    """The worker is caught mid-shard, blocked opening a FIFO in the source, and SIGKILLed there; before that a
    regular copy of a photo replaces the FIFO, so Spark's retry of the task reads a good image. The FIFO replaces a
    photo after listing: one already there when the source is listed is an error row, never opened."""
    source = tmp_path / "source" / "Training"
    photos = sorted((demo_root / "Training" / "Banana").glob("*.jpg"))[:6]
    (source / "Banana").mkdir(parents=True)
    for photo in photos:
        shutil.copy(photo, source / "Banana" / photo.name)
    fifo = source / "Banana" / "via-fifo.jpg"
    shutil.copy(photos[0], fifo)
    real_plan_run = pipeline.plan_run

    def list_then_swap(*args, **kwargs):
        planned = real_plan_run(*args, **kwargs)
        fifo.unlink()
        os.mkfifo(fifo)
        return planned
    monkeypatch.setattr(pipeline, "plan_run", list_then_swap)
    out = tmp_path / "out"
    config = build_config({}, {"source": str(source.parent), "output": str(out), "image_size": 96, "pca_k": 2,
                               "shard_size": 3, "read_timeout_s": 120.0, "cache_dir": cache_dir, "quiet": True})
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run(config)), daemon=True)
    runner.start()
    try:
        victim = _blocked_opening_a_fifo(fifo, 120)
        replacement = fifo.with_name(".replacement")
        shutil.copy(photos[0], replacement)
        os.replace(replacement, fifo)
        os.kill(victim, signal.SIGKILL)
        runner.join(timeout=180)
    finally:
        if fifo.is_fifo():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    result = outcome["result"]
    assert result.images_listed == result.images_ok == 7 and result.images_failed == 0
    features = result.features().set_index("path")
    retried_path = "Training/Banana/via-fifo.jpg"
    np.testing.assert_allclose(np.asarray(features.loc[retried_path, "features"]),
                               np.asarray(features.loc[f"Training/Banana/{photos[0].name}", "features"]), atol=1e-5)
    shard_stats = {}
    for stats_file in (out / "_shards").glob("part-*.json"):
        paths = set(pd.read_parquet(out / "metadata" / f"{stats_file.stem}.parquet")["path"])
        shard_stats[stats_file.stem] = (retried_path in paths, json.loads(stats_file.read_text()))
    (retried,) = [stats for holds, stats in shard_stats.values() if holds]
    assert retried["task_attempt"] >= 1 and retried["executor"]["pid"] != victim
    assert all(stats["task_attempt"] == 0 for holds, stats in shard_stats.values() if not holds)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_spark_master_fails_fast_with_one_line(demo_root, cache_dir, tmp_path):
    master = f"spark://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    finished = subprocess.run(_cli("run", str(demo_root), str(tmp_path / "out"), "--master", master,
                                   "--cache-dir", cache_dir, "--image-size", "96"),
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 2
    assert time.monotonic() - started < 60
    err = finished.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fruitpipe: error: cannot reach Spark master") and master in err[0]
    assert not (tmp_path / "out").exists()


def _fails_cleanly(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fruitpipe: error:") and expected in err, err


def test_unreadable_weights_file(capsys, demo_root, cache_dir, tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"\x00not a state dict" * 64)
    _fails_cleanly(capsys, ["run", str(demo_root), str(tmp_path / "out"), "--weights", str(weights),
                            "--cache-dir", cache_dir], "is not a PyTorch state dict file")
    _fails_cleanly(capsys, ["run", str(demo_root), str(tmp_path / "out"), "--weights", str(tmp_path),
                            "--cache-dir", cache_dir], "weights file not found")
    assert not (tmp_path / "out").exists()


def test_unwritable_output(capsys, demo_root, cache_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    common = ["--image-size", "96", "--cache-dir", cache_dir, "--quiet"]
    _fails_cleanly(capsys, ["run", str(demo_root), str(blocker / "out"), *common], "cannot use output")
    _fails_cleanly(capsys, ["run", str(demo_root), str(blocker), *common], "is a file")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_read_only_output_folder(capsys, demo_root, spark, cache_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _fails_cleanly(capsys, ["run", str(demo_root), str(locked / "out"), "--image-size", "96",
                                "--cache-dir", cache_dir, "--quiet"], "cannot write to output")
    finally:
        locked.chmod(0o755)
    assert not list(locked.iterdir())


@pytest.mark.parametrize("argv_tail, config_text, expected", [
    (["--read-timeout", "soon"], None, "invalid float value"),
    (["--read-timeout", "0"], None, "--read-timeout must be a positive number"),
    (["--spark-conf", "spark.executor.memory"], None, "--spark-conf expects key=value"),
    ([], "read_timeout_s: soon\n", "option read_timeout_s has the wrong type"),
    ([], "shard_size: 1.5\n", "option shard_size has the wrong type"),
    ([], "spark_conf: [a, b]\n", "spark_conf must be a mapping"),
    ([], "retries: 3\n", "unknown option 'retries'"),
])
def test_bad_options_fail_with_one_line(capsys, tmp_path, argv_tail, config_text, expected):
    head = ["run", str(tmp_path / "src"), str(tmp_path / "out")]
    if config_text is not None:
        (tmp_path / "fruitpipe.yaml").write_text(config_text)
        head = ["--config", str(tmp_path / "fruitpipe.yaml"), *head]
    try:
        code = main([*head, *argv_tail])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out").exists()
