"""The property that ties the fault handling together, over randomised fault schedules on small data.

Each schedule plants bad files in a small source on S3 (moto, behind a proxy that can throttle, reset or freeze
it), then runs `fruitpipe run` with faults at random moments: the driver killed (SIGKILL), the store frozen,
answering 503 or resetting connections. Afterwards the same command is run until it exits 0. Then, compared with
the listing and with a fault-free reference run over the same files:

- every listed file is a features row or an error row, never both, never twice;
- no error row is transient (a timeout or a storage error is retried, not kept);
- the features equal the reference run's (nothing stale, nothing from an aborted attempt);
- the manifest matches the folder: counts, outputs and their row counts.

A handful of schedules run in the default suite; `make test-slow` runs dozens.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.support.moto_server import MotoServer
from tests.support.compare import vectors
from tests.support.proxy import FaultyProxy
from tests.support.s3 import BUCKET, create_bucket, object_keys, read_object, read_parquet_dir, s3_environment

pytestmark = [pytest.mark.s3, pytest.mark.spark]

SETTINGS = ["--image-size", "64", "--pca-k", "4", "--shard-size", "6", "--batch-size", "4", "--read-timeout", "3"]
# Bad files planted into the first (0) or second (1) class folder, made from a good image's bytes.
BAD_FILES = {
    "truncated.jpg": (0, lambda good: good[: len(good) // 3]),
    "empty.jpg": (0, lambda good: b""),
    "not-an-image.jpg": (1, lambda good: b"this is text, not a JPEG\n" * 20),
    "notes.txt": (1, lambda good: b"a stray file\n"),
}
FAULTS = ("kill", "stall", "503", "reset")
FINAL_ATTEMPTS = 4


@dataclass(frozen=True)
class Schedule:
    """What goes wrong in one case: the bad files planted and, per faulty attempt, (seconds after start, fault)."""

    seed: int
    bad_files: tuple[str, ...]
    attempts: tuple[tuple[tuple[float, str], ...], ...]


def schedule_for(seed: int) -> Schedule:
    rng = random.Random(seed)
    bad = tuple(sorted(rng.sample(sorted(BAD_FILES), rng.randint(0, len(BAD_FILES)))))
    attempts = tuple(tuple(sorted((round(rng.uniform(2, 25), 1), rng.choice(FAULTS))
                                  for _ in range(rng.randint(1, 2))))
                     for _ in range(rng.randint(1, 2)))
    return Schedule(seed, bad, attempts)


@pytest.fixture(scope="module")
def small_source(demo_root, tmp_path_factory) -> Path:
    """3 classes x 8 training images of the demo set: 4 shards of 6, small enough for many runs."""
    root = tmp_path_factory.mktemp("schedules") / "source"
    for label in sorted(os.listdir(demo_root / "Training"))[:3]:
        target = root / "Training" / label
        target.mkdir(parents=True)
        for name in sorted(os.listdir(demo_root / "Training" / label))[:8]:
            shutil.copy2(demo_root / "Training" / label / name, target / name)
    return root


@pytest.fixture(scope="module")
def store(small_source):
    with MotoServer() as moto:
        client = create_bucket(moto)
        proxy = FaultyProxy(moto.port)
        try:
            yield moto, client, proxy
        finally:
            proxy.close()


@pytest.fixture(scope="module")
def reference(small_source, store, cache_dir, tmp_path_factory) -> dict[str, np.ndarray]:
    """Features by path from a fault-free local run over the good files."""
    output = tmp_path_factory.mktemp("schedules") / "reference"
    done = subprocess.run([sys.executable, "-m", "fruitpipe.cli", "run", str(small_source), str(output), *SETTINGS,
                           "--cache-dir", cache_dir, "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import pandas as pd

    features = pd.read_parquet(output / "features")
    return dict(zip(features["path"], vectors(features, "features")))


def _plant(client, small_source: Path, prefix: str, schedule: Schedule) -> set[str]:
    """The source under s3://BUCKET/<prefix>/ with the schedule's bad files; returns every listed file's path."""
    listed = set()
    classes = sorted(os.listdir(small_source / "Training"))
    good = next((small_source / "Training").rglob("*.jpg")).read_bytes()
    for path in sorted(small_source.rglob("*")):
        if path.is_file():
            relative = path.relative_to(small_source).as_posix()
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{relative}", Body=path.read_bytes())
            listed.add(relative)
    for name in schedule.bad_files:
        folder, make = BAD_FILES[name]
        relative = f"Training/{classes[folder]}/{name}"
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{relative}", Body=make(good))
        listed.add(relative)
    return listed


def _attempt(moto: MotoServer, proxy: FaultyProxy, prefix: str, cache_dir: str,
             faults: tuple[tuple[float, str], ...]) -> int:
    """One `fruitpipe run` through the proxy with these faults at these moments; returns its exit status."""
    env = s3_environment(moto, AWS_ENDPOINT_URL=proxy.url, FRUITPIPE_STORAGE_RETRY_S="4",
                         FRUITPIPE_STORAGE_TIMEOUT_S="5")
    process = subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "run", f"s3://{BUCKET}/{prefix}/src",
                                f"s3://{BUCKET}/{prefix}/out", *SETTINGS, "--cache-dir", cache_dir, "--quiet"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    started = time.monotonic()
    try:
        for moment, fault in faults:
            while time.monotonic() - started < moment and process.poll() is None:
                time.sleep(0.1)
            if process.poll() is not None:
                break
            if fault == "kill":
                os.killpg(process.pid, signal.SIGKILL)
                break
            proxy.set_mode("stall" if fault == "stall" else fault)
            time.sleep(3)
            proxy.set_mode("pass")
        return process.wait(timeout=600)
    finally:
        proxy.set_mode("pass")
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _check_property(client, prefix: str, listed: set[str], reference: dict[str, np.ndarray]) -> None:
    out = f"{prefix}/out"
    features = read_parquet_dir(client, BUCKET, f"{out}/features")
    errors = read_parquet_dir(client, BUCKET, f"{out}/errors")
    pca = read_parquet_dir(client, BUCKET, f"{out}/pca")
    feature_paths, error_paths = list(features["path"]), list(errors["path"])
    assert len(feature_paths) == len(set(feature_paths)), "an image has two features rows"
    assert len(error_paths) == len(set(error_paths)), "a file has two error rows"
    assert set(feature_paths).isdisjoint(error_paths), "a file is both a features row and an error row"
    assert set(feature_paths) | set(error_paths) == listed, "a listed file has no row"
    assert not errors["retryable"].any(), errors[errors["retryable"]].to_dict("records")
    assert not errors["reason"].str.contains("timed out|unreachable|SlowDown|reset", case=False).any()
    ours = dict(zip(features["path"], vectors(features, "features")))
    assert set(ours) == set(reference)
    for path, vector in ours.items():
        np.testing.assert_allclose(vector, reference[path], atol=1e-5, err_msg=path)
    assert sorted(pca["path"]) == sorted(feature_paths)

    manifest = json.loads(read_object(client, BUCKET, f"{out}/manifest.json"))
    assert manifest["images_listed"] == len(listed)
    assert manifest["images_ok"] == len(features)
    assert manifest["images_failed"] == len(errors)
    assert manifest.get("images_retryable", 0) == 0
    for directory, frame in (("features", features), ("pca", pca), ("errors", errors)):
        parts = [key for key in object_keys(client, BUCKET, f"{out}/{directory}") if key.endswith(".parquet")]
        assert manifest["outputs"][directory] == {"format": "parquet", "parts": len(parts), "rows": len(frame)}


def _run_schedule(seed: int, store, small_source: Path, reference, cache_dir: str) -> None:
    moto, client, proxy = store
    schedule = schedule_for(seed)
    prefix = f"schedule-{seed}"
    listed = _plant(client, small_source, f"{prefix}/src", schedule)
    for faults in schedule.attempts:
        _attempt(moto, proxy, prefix, cache_dir, faults)
    statuses = []
    for _ in range(FINAL_ATTEMPTS):
        statuses.append(_attempt(moto, proxy, prefix, cache_dir, ()))
        if statuses[-1] == 0:
            break
    assert statuses[-1] == 0, f"{schedule}: final runs exited {statuses}"
    _check_property(client, prefix, listed, reference)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_after_any_fault_schedule_every_file_is_one_good_row(seed, store, small_source, reference, cache_dir):
    _run_schedule(seed, store, small_source, reference, cache_dir)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 130))
def test_after_dozens_of_fault_schedules_every_file_is_one_good_row(seed, store, small_source, reference,
                                                                   cache_dir):
    _run_schedule(seed, store, small_source, reference, cache_dir)
