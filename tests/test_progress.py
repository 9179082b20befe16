"""Driver progress: counts from the shard stats files, plain lines off a terminal, a bar on one, silence when quiet."""

from __future__ import annotations

import io
import os
import re
import select
import shutil
import threading
import time

import pyarrow as pa
import pytest

import fruitpipe
from fruitpipe.progress import ExtractionProgress
from fruitpipe.records import ShardStats
from fruitpipe.run_folder import RunFolder, ShardTables
from tests.support.moto_server import MotoServer

SHARDS = {0: 20, 1: 20, 2: 15}


def _finish_shard(output: str, shard_id: int, failed: int) -> None:
    """What a shard task writes: its parts (empty here) and, last, its stats file."""
    images = SHARDS[shard_id]
    empty = pa.table({"image_id": pa.array([], pa.string())})
    RunFolder(output).write_shard(shard_id, ShardTables(empty, empty, empty),
                                  lambda: ShardStats(shard_id=shard_id, images=images, ok=images - failed,
                                                     failed=failed, feature_dim=0, images_sha256=""))


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _drain(descriptor: int) -> str:
    chunks = []
    while select.select([descriptor], [], [], 0.2)[0]:
        chunks.append(os.read(descriptor, 65536))
    return b"".join(chunks).decode()


def _progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fruitpipe-progress"]


def test_plain_lines_follow_the_stats_files_and_count_resumed_shards_as_done(tmp_path):
    output = str(tmp_path / "run")
    _finish_shard(output, 0, failed=1)
    stream = io.StringIO()
    progress = ExtractionProgress(output, SHARDS, resumed={0}, stream=stream, poll_seconds=0.02,
                                  log_every_seconds=0.1)
    with progress:
        assert progress.counts.images_done == 20 and progress.counts.new_images == 0
        _wait_until(lambda: progress.counts.failed == 1)
        _finish_shard(output, 1, failed=2)
        _wait_until(lambda: progress.counts.images_done == 40)
        _wait_until(lambda: "40/55 images" in stream.getvalue())
        _finish_shard(output, 2, failed=0)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "fruitpipe extract: 55 images in 3 shards, 1 resumed (20 images)"
    periodic = [line for line in lines[1:-1] if line.startswith("fruitpipe extract: ")]
    assert periodic and all(re.search(r"\d+ s elapsed, [\d.]+ images/s, ETA (\d+ s|\?), ", line) for line in periodic)
    assert any(line.startswith("fruitpipe extract: 40/55 images (73%)") and "3 errors, 2/3 shards" in line
               for line in periodic)
    final = lines[-1]
    assert final.startswith("fruitpipe extract done: 55/55 images (100%), ")
    assert final.endswith("3 errors, 3/3 shards")
    assert progress.counts.new_images == 35 and progress.counts.shards_done == 3
    assert not _progress_threads()


def test_quiet_writes_nothing_and_starts_no_thread(tmp_path):
    output = str(tmp_path / "run")
    stream = io.StringIO()
    with ExtractionProgress(output, SHARDS, resumed=(), quiet=True, stream=stream, poll_seconds=0.01):
        assert not _progress_threads()
        _finish_shard(output, 0, failed=0)
        time.sleep(0.1)
    assert stream.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar(tmp_path):
    output = str(tmp_path / "run")
    leader, follower = os.openpty()
    with open(follower, "w", encoding="utf-8", closefd=True) as terminal:
        progress = ExtractionProgress(output, SHARDS, resumed=(), stream=terminal, poll_seconds=0.02)
        with progress:
            for shard_id in SHARDS:
                _finish_shard(output, shard_id, failed=shard_id)
            _wait_until(lambda: progress.counts.shards_done == 3)
        written = _drain(leader)
    os.close(leader)
    assert "\r" in written and "extract: 100%" in written and "55/55" in written
    assert "3 errors" in written
    assert "fruitpipe extract" not in written


@pytest.mark.s3
def test_progress_reads_stats_files_on_s3(monkeypatch):
    with MotoServer() as moto:
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        for name, value in moto.env().items():
            monkeypatch.setenv(name, value)
        moto.client("s3").create_bucket(Bucket="runs", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        output = "s3://runs/demo-run"
        stream = io.StringIO()
        progress = ExtractionProgress(output, SHARDS, resumed=(), stream=stream, poll_seconds=0.05)
        with progress:
            _finish_shard(output, 2, failed=4)
            _wait_until(lambda: progress.counts.images_done == 15)
            _finish_shard(output, 0, failed=0)
        assert stream.getvalue().splitlines()[-1].startswith("fruitpipe extract done: 35/55 images (64%)")
        assert progress.counts.failed == 4 and progress.counts.shards_done == 2


@pytest.mark.spark
def test_a_run_reports_progress_on_stderr_and_quiet_silences_it(demo_root, spark, cache_dir, tmp_path, capsys):
    source = tmp_path / "photos"
    for label in sorted(p.name for p in (demo_root / "Training").iterdir())[:2]:
        shutil.copytree(demo_root / "Training" / label, source / "Training" / label)
    broken = sorted((source / "Training").glob("*/*.jpg"))[0]
    broken.write_bytes(b"not a jpeg at all")
    options = {"source": str(source), "output": str(tmp_path / "run"), "per_class": 5, "shard_size": 4,
               "pca_k": 3, "cache_dir": cache_dir}

    result = fruitpipe.run(**options)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fruitpipe extract")]
    assert lines[0] == "fruitpipe extract: 10 images in 3 shards, 0 resumed (0 images)"
    assert lines[-1].startswith("fruitpipe extract done: 10/10 images (100%)")
    assert lines[-1].endswith("1 error, 3/3 shards") and result.images_failed == 1

    again = fruitpipe.run(**options)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fruitpipe extract")]
    assert lines[0] == "fruitpipe extract: 10 images in 3 shards, 3 resumed (10 images)"
    assert lines[-1].startswith("fruitpipe extract done: 10/10 images (100%), 0.0 images/s")
    assert lines[-1].endswith("1 error, 3/3 shards") and again.shards_resumed == 3

    fruitpipe.run(**options, quiet=True)
    assert "fruitpipe extract" not in capsys.readouterr().err
