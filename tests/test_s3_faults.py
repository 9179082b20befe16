"""S3 faults during a run: the store (moto_server on loopback, behind a TCP proxy that can cut it off) answers
503 or refuses connections for a while. A short outage is retried and the run completes with every image; a long
one stops the run with one clear line, and the same command afterwards resumes and completes it."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from tests.support.compare import vectors
from tests.support.moto_server import MotoServer
from tests.support.proxy import FaultyProxy
from tests.support.s3 import BUCKET, create_bucket, object_keys, read_parquet_dir, s3_environment, upload_tree

pytestmark = [pytest.mark.s3, pytest.mark.spark]


@pytest.fixture(scope="module")
def store(demo_root):
    """moto_server holding the demo dataset, and a proxy in front of it that the runs talk to."""
    with MotoServer() as moto:
        client = create_bucket(moto)
        upload_tree(client, demo_root, BUCKET, "demo")
        proxy = FaultyProxy(moto.port)
        try:
            yield moto, client, proxy
        finally:
            proxy.close()


def _start_run(moto: MotoServer, proxy: FaultyProxy, output: str, cache_dir: str,
               *options: str) -> subprocess.Popen[str]:
    """`fruitpipe run` through the proxy, 9 shards of 8 images, with a 6 s storage retry budget so that a long
    outage ends the run within a minute (the default budget is 30 s per operation)."""
    env = s3_environment(moto, AWS_ENDPOINT_URL=proxy.url, FRUITPIPE_STORAGE_RETRY_S="6")
    return subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "run", f"s3://{BUCKET}/demo",
                             f"s3://{BUCKET}/{output}", "--pca-k", "10", "--shard-size", "8", "--cache-dir", cache_dir,
                             *options], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_shard(client, process: subprocess.Popen[str], output: str, timeout_s: float = 300) -> None:
    """Return once the run has finished its first shard (seen straight on moto, not through the proxy)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if object_keys(client, BUCKET, f"{output}/_shards"):
            return
        assert process.poll() is None, process.communicate()[1][-4000:]
        time.sleep(0.2)
    process.kill()
    pytest.fail("the run finished no shard in time")


def _assert_complete_and_equal(client, output: str, finished_run) -> None:
    """Every image has its features row, none is lost or doubled, and the features equal the local run's."""
    features = read_parquet_dir(client, BUCKET, f"{output}/features")
    assert features["image_id"].is_unique
    assert read_parquet_dir(client, BUCKET, f"{output}/errors").empty
    local = finished_run.features().set_index("image_id").sort_index()
    remote = features.set_index("image_id").sort_index()
    assert list(remote.index) == list(local.index)
    np.testing.assert_allclose(vectors(remote, "features"), vectors(local, "features"), atol=1e-5)


@contextlib.contextmanager
def _run_past_first_shard(store, output: str, cache_dir: str, *options: str) -> Iterator[subprocess.Popen[str]]:
    """A run through the proxy, once it has finished a shard; afterwards the proxy passes and the run is gone."""
    moto, client, proxy = store
    process = _start_run(moto, proxy, output, cache_dir, *options)
    try:
        _wait_for_first_shard(client, process, output)
        yield process
    finally:
        proxy.set_mode("pass")
        if process.poll() is None:
            process.kill()


def test_a_short_outage_is_retried_and_the_run_completes(store, cache_dir, finished_run):
    moto, client, proxy = store
    with _run_past_first_shard(store, "runs/short-outage", cache_dir) as process:
        proxy.set_mode("503")
        time.sleep(2)
        proxy.set_mode("reset")
        time.sleep(2)
        faults = proxy.faults
        proxy.set_mode("pass")
        stdout, stderr = process.communicate(timeout=600)
    assert faults > 0, "the outage hit no request"
    assert process.returncode == 0, stderr[-4000:]
    assert "images: 72 ok, 0 failed of 72 listed (9 shards, 0 resumed)" in stdout
    _assert_complete_and_equal(client, "runs/short-outage", finished_run)


def test_a_long_outage_stops_the_run_with_one_line_and_the_next_run_resumes(store, cache_dir, finished_run):
    moto, client, proxy = store
    with _run_past_first_shard(store, "runs/long-outage", cache_dir) as process:
        proxy.set_mode("reset")
        _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, stderr[-4000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("fruitpipe: error: storage unreachable: s3://") and last.endswith(
        "run the same command again to resume"), stderr[-4000:]
    # No traceback of fruitpipe's reaches the user. (PySpark's worker daemon may still print an EOFError for a
    # task that Spark cancelled when it aborted the job; that is PySpark's own stderr, not a failure report.)
    assert not re.search(r'File "[^"]*/fruitpipe/[a-z_]+(/[a-z_]+)?\.py"', stderr), stderr[-4000:]
    assert "Exception in task" not in stderr, stderr[-4000:]
    done_before = len(object_keys(client, BUCKET, "runs/long-outage/_shards"))
    assert 1 <= done_before < 9

    again = _start_run(moto, proxy, "runs/long-outage", cache_dir)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-4000:]
    assert f"images: 72 ok, 0 failed of 72 listed (9 shards, {done_before} resumed)" in stdout
    _assert_complete_and_equal(client, "runs/long-outage", finished_run)


def test_a_hung_call_is_cancelled_and_retried_on_a_fresh_connection_pool(store, monkeypatch):
    """A store that accepts connections and never answers: the call is cancelled at its deadline and retried, and
    once the store answers again the read completes, long before the S3 client's own 15 s read timeout."""
    from fruitpipe.storage import locate, read_bytes

    moto, client, proxy = store
    client.put_object(Bucket=BUCKET, Key="hung/one.bin", Body=b"fruit" * 1000)
    for name, value in s3_environment(moto, AWS_ENDPOINT_URL=proxy.url, FRUITPIPE_STORAGE_TIMEOUT_S="1",
                                      FRUITPIPE_STORAGE_RETRY_S="30").items():
        monkeypatch.setenv(name, value)
    location = locate(f"s3://{BUCKET}/hung")
    proxy.set_mode("stall")
    threading.Timer(2.5, proxy.set_mode, args=("pass",)).start()
    started = time.monotonic()
    try:
        data = read_bytes(location, location.join("one.bin"))
    finally:
        proxy.set_mode("pass")
    elapsed = time.monotonic() - started
    assert data == b"fruit" * 1000
    assert 2.5 <= elapsed < 10, f"{elapsed:.1f} s"


def test_a_frozen_store_gives_up_in_one_line_within_its_budget(store, monkeypatch):
    """No call outlives its deadline: a store frozen for good ends in StorageUnavailable, not a hang."""
    from fruitpipe.storage import StorageUnavailable, locate, read_bytes

    moto, _, proxy = store
    for name, value in s3_environment(moto, AWS_ENDPOINT_URL=proxy.url, FRUITPIPE_STORAGE_TIMEOUT_S="1",
                                      FRUITPIPE_STORAGE_RETRY_S="3").items():
        monkeypatch.setenv(name, value)
    location = locate(f"s3://{BUCKET}/hung")
    proxy.set_mode("stall")
    started = time.monotonic()
    try:
        with pytest.raises(StorageUnavailable, match="run the same command again to resume"):
            read_bytes(location, location.join("one.bin"))
    finally:
        proxy.set_mode("pass")
    assert time.monotonic() - started < 15


@pytest.mark.slow
@pytest.mark.timeout(20 * 300)  # each run has its own 300 s bound below; 20 runs take 10-20 min on 2 cores
def test_short_outages_at_any_moment_never_hang_a_run(store, cache_dir, finished_run):
    """The short-outage run 20 times over, each outage at a random moment (extraction, PCA or the outputs):
    503s, then resets, then a frozen store, 1.5 to 4.5 s in all (within the runs' 6 s retry budget): every run
    completes, with every image."""
    moto, client, proxy = store
    schedule = __import__("random").Random(14)
    for attempt in range(20):
        output = f"runs/outage-{attempt}"
        with _run_past_first_shard(store, output, cache_dir) as process:
            time.sleep(schedule.uniform(0, 8))
            for mode in ("503", "reset", "stall"):
                proxy.set_mode(mode)
                time.sleep(schedule.uniform(0.5, 1.5))
            proxy.set_mode("pass")
            stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"attempt {attempt}: {stderr[-4000:]}"
        assert "images: 72 ok, 0 failed of 72 listed" in stdout
        _assert_complete_and_equal(client, output, finished_run)


def test_a_stalled_store_times_reads_out_and_they_are_retried_not_failed(store, cache_dir, finished_run):
    """moto frozen with SIGSTOP for 8 s mid-run, with a 3 s read timeout: the reads that time out are loaded again
    once the store answers, and the run ends with every image (a timeout is not a verdict on the image)."""
    moto, client, _ = store
    with _run_past_first_shard(store, "runs/stall", cache_dir, "--read-timeout", "3") as process:
        with moto.frozen():
            time.sleep(8)
        stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    assert "images: 72 ok, 0 failed of 72 listed" in stdout
    _assert_complete_and_equal(client, "runs/stall", finished_run)


def test_reads_still_stalled_after_every_attempt_are_reported_apart_and_the_next_run_retries_them(
        store, cache_dir, finished_run):
    """A stall longer than every attempt: the images are retryable error rows, not failed ones; the run says so and
    exits 3; the same command afterwards retries exactly those shards and completes.

    The store is frozen three times for 10 s with a blink between: a task that was between shards when the stall
    began (reading its rows from the plan: a storage call, which waits out a stall) gets its rows in a blink and
    then reads its images in the next freeze, so some image reads stall on every attempt whenever the stall began."""
    moto, client, proxy = store
    output = "runs/long-stall"
    with _run_past_first_shard(store, output, cache_dir, "--read-timeout", "2") as process:
        for blink in range(3):
            with moto.frozen():
                time.sleep(10)
            time.sleep(0.1 if blink < 2 else 0)
        stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 3, stdout + stderr[-4000:]
    assert re.search(r"images: \d+ ok, 0 failed, [1-9]\d* to retry of 72 listed", stdout), stdout
    errors = read_parquet_dir(client, BUCKET, f"{output}/errors")
    assert len(errors) and errors["retryable"].all() and errors["reason"].str.startswith("timed out").all()
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"{output}/manifest.json")["Body"].read())
    assert manifest["images_retryable"] == len(errors) and manifest["images_failed"] == 0

    again = _start_run(moto, proxy, output, cache_dir)
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr[-4000:]
    assert "images: 72 ok, 0 failed of 72 listed" in stdout
    _assert_complete_and_equal(client, output, finished_run)
