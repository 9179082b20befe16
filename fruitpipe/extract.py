"""The work of one shard, run inside a Spark task: read bytes -> decode + resize -> ONNX batches -> write.

Reads and decodes run in a few daemon threads ahead of inference (PIL and the network release the GIL), bounded
so memory stays flat; one that hangs past the read timeout is abandoned. Every image ends as a features row or an
error row with its stage; the shard's outputs are written whole, and its stats file, written last, marks it done.
On resume a shard counts as done only when its stats file and its parts agree (`completed_shards`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from fruitpipe import sinks
from fruitpipe.images import ImageDecodeError, Preprocessing, image_size, preprocess
from fruitpipe.inference import extract_features, session_for
from fruitpipe.storage import (Location, StorageUnavailable, list_names, locate, read_bytes, remove_tree,
                               with_retries)

IMAGE_COLUMNS = ["image_id", "path", "label", "label_index", "split", "bytes", "shard_id"]
# Images decoded ahead of inference, at least: enough to keep io_threads busy and hide object-store latency.
PREFETCH_IMAGES = 32
# More hung reads than this in one shard means the storage hangs, not one file: fail the task so Spark retries it.
MAX_HUNG_READS = 8
# storage.write_bytes writes `.<name>.<uuid4 hex>.tmp` and renames it; a killed writer leaves the temp behind.
_PARTIAL_WRITE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


@dataclass(frozen=True)
class ExtractionSettings:
    """What every shard task needs besides its images; small and picklable."""

    source: str
    output: str
    preprocessing: Preprocessing
    model_key: str
    batch_size: int
    threads: int
    read_timeout_s: float
    io_threads: int = 4


@dataclass
class _Loaded:
    tensor: np.ndarray | None = None
    width: int = 0
    height: int = 0
    image_format: str = ""
    stage: str = ""
    reason: str = ""


@dataclass
class ShardTimer:
    """Seconds spent per phase inside one shard (read+decode overlap inference, so they do not add up)."""

    read: float = 0.0
    decode: float = 0.0
    infer: float = 0.0
    write: float = 0.0
    wall: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Job:
    """One image's load as the prefetcher tracks it: which stage it is in, since when, and its result."""

    record: dict
    stage: str = "read"
    started: float | None = None
    result: _Loaded | None = None
    abandoned: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class HungReadsError(RuntimeError):
    """Many reads of one shard hung: the storage is at fault, not single images, so the task fails and is retried."""


def _load(source: Location, job: _Job, prep: Preprocessing, timer: ShardTimer) -> _Loaded:
    started = time.perf_counter()
    try:
        data = read_bytes(source, source.join(job.record["path"]))
    except FileNotFoundError:
        return _Loaded(stage="read", reason="file vanished after listing (not found)")
    except PermissionError as exc:
        return _Loaded(stage="read", reason=f"permission denied: {exc.strerror or exc}")
    except StorageUnavailable:
        raise
    except Exception as exc:
        return _Loaded(stage="read", reason=f"{type(exc).__name__}: {exc}")
    finally:
        timer.read += time.perf_counter() - started
    job.stage = "decode"
    started = time.perf_counter()
    try:
        tensor, (width, height) = preprocess(data, prep)
        header = image_size(data)
        return _Loaded(tensor, width, height, header[2] if header else "")
    except ImageDecodeError as exc:
        header = image_size(data)
        return _Loaded(width=header[0] if header else 0, height=header[1] if header else 0,
                       image_format=header[2] if header else "", stage="decode", reason=str(exc))
    except Exception as exc:
        return _Loaded(stage="decode", reason=f"{type(exc).__name__}: {exc}")
    finally:
        timer.decode += time.perf_counter() - started


def _prefetched(records: list[dict], load: Callable[[_Job], _Loaded], threads: int, window: int, timeout_s: float,
                max_hung: int = MAX_HUNG_READS) -> Iterator[tuple[dict, _Loaded]]:
    """Loads in input order, up to `window` ahead on `threads` daemon threads.

    A load running longer than timeout_s (a hung network read, a FIFO, a pathological file) becomes an error row;
    its thread is abandoned, never joined, and replaced, so neither the shard nor the worker process's exit waits
    for it. More than `max_hung` hung loads raise HungReadsError.
    """
    lock = threading.Lock()
    jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
    closed = threading.Event()

    def work() -> None:
        while (job := jobs.get()) is not None:
            if closed.is_set():
                continue
            with lock:
                job.started = time.monotonic()
            try:
                loaded: _Loaded | StorageUnavailable = load(job)
            except StorageUnavailable as exc:
                loaded = exc
            with lock:
                job.result = loaded
                job.done.set()
                if job.abandoned:
                    return

    def start_thread() -> None:
        threading.Thread(target=work, name="fruitpipe-load", daemon=True).start()

    def outcome(job: _Job) -> _Loaded | None:
        """The job's result, or None once it has run longer than the timeout (it is then abandoned)."""
        while True:
            with lock:
                if job.result is not None:
                    return job.result
                if job.started is not None and time.monotonic() - job.started >= timeout_s:
                    job.abandoned = True
                    return None
                wait = 0.05 if job.started is None else job.started + timeout_s - time.monotonic()
            job.done.wait(max(wait, 0.001))

    pending: deque[_Job] = deque()
    upcoming = iter(records)

    def submit_next() -> None:
        record = next(upcoming, None)
        if record is not None:
            pending.append(job := _Job(record))
            jobs.put(job)

    hung = 0
    for _ in range(threads):
        start_thread()
    try:
        for _ in range(window):
            submit_next()
        while pending:
            job = pending.popleft()
            loaded = outcome(job)
            if isinstance(loaded, StorageUnavailable):
                raise loaded
            if loaded is None:
                hung += 1
                if hung > max_hung:
                    raise HungReadsError(f"{hung} images hung longer than {timeout_s:g} s each; is the source storage "
                                         "reachable?")
                start_thread()
                action = "reading" if job.stage == "read" else "decoding"
                loaded = _Loaded(stage=job.stage, reason=f"timed out after {timeout_s:g} s {action}")
            submit_next()
            yield job.record, loaded
    finally:
        closed.set()
        for _ in range(threads):
            jobs.put(None)


def process_shard(shard_id: int, records: list[dict], settings: ExtractionSettings,
                  load_model_bytes: Callable[[], bytes]) -> dict:
    """Extract features for one shard's images and write its outputs; returns the shard's stats."""
    wall_started = time.perf_counter()
    timer = ShardTimer()
    source, out = locate(settings.source), locate(settings.output)
    session = session_for(settings.model_key, load_model_bytes, settings.threads)
    ok_rows: list[dict] = []
    ok_vectors: list[np.ndarray] = []
    metadata_rows: list[dict] = []
    error_rows: list[dict] = []
    batch: list[tuple[dict, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        started = time.perf_counter()
        try:
            vectors = extract_features(session, np.stack([tensor for _, tensor in batch]))
        except Exception as exc:
            for record, _ in batch:
                error_rows.append(_error(record, "infer", f"{type(exc).__name__}: {exc}"))
                _mark_failed(metadata_rows, record["image_id"])
        else:
            ok_rows.extend(record for record, _ in batch)
            ok_vectors.append(vectors)
        timer.infer += time.perf_counter() - started
        batch.clear()

    loaded_stream = _prefetched(records, lambda job: _load(source, job, settings.preprocessing, timer),
                                threads=settings.io_threads, window=max(2 * settings.batch_size, PREFETCH_IMAGES),
                                timeout_s=settings.read_timeout_s)
    for record, loaded in loaded_stream:
        ok = loaded.tensor is not None
        metadata_rows.append({"image_id": record["image_id"], "path": record["path"], "label": record["label"],
                              "split": record["split"], "width": loaded.width, "height": loaded.height,
                              "bytes": record["bytes"], "format": loaded.image_format,
                              "status": "ok" if ok else "failed"})
        if ok:
            batch.append((record, loaded.tensor))
            if len(batch) == settings.batch_size:
                flush()
        else:
            error_rows.append(_error(record, loaded.stage, loaded.reason))
    flush()

    started = time.perf_counter()
    features = np.concatenate(ok_vectors) if ok_vectors else np.zeros((0, 0), dtype=np.float32)
    keys = pd.DataFrame(ok_rows, columns=IMAGE_COLUMNS)
    sinks.write_parquet(out, sinks.FEATURES, sinks.part_name(shard_id), sinks.vectors_table(keys, "features", features))
    sinks.write_parquet(out, sinks.METADATA, sinks.part_name(shard_id),
                        pa.Table.from_pylist(metadata_rows, schema=sinks.METADATA_SCHEMA))
    sinks.write_parquet(out, sinks.ERRORS, sinks.part_name(shard_id),
                        pa.Table.from_pylist(error_rows, schema=sinks.ERRORS_SCHEMA))
    timer.write += time.perf_counter() - started
    timer.wall = time.perf_counter() - wall_started
    stats = {
        "shard_id": shard_id,
        "images": len(records),
        "ok": len(ok_rows),
        "failed": len(error_rows),
        "feature_dim": int(features.shape[1]) if features.size else 0,
        "images_sha256": records_digest(records),
        "task_attempt": _task_attempt(),
        "seconds": {"read": timer.read, "decode": timer.decode, "infer": timer.infer, "write": timer.write,
                    "wall": timer.wall},
        "executor": executor_identity(),
        "finished_at": time.time(),
    }
    sinks.write_json(out, f"{sinks.SHARD_STATS}/{sinks.part_name(shard_id, '.json')}", stats)
    return stats


def _error(record: dict, stage: str, reason: str) -> dict:
    return {"image_id": record["image_id"], "path": record["path"], "label": record["label"],
            "stage": stage, "reason": reason[:500]}


def _mark_failed(metadata_rows: list[dict], image_id: str) -> None:
    for row in reversed(metadata_rows):
        if row["image_id"] == image_id:
            row["status"] = "failed"
            return


def _task_attempt() -> int:
    """Spark's attempt number of the running task (0 on the first try), kept in the stats to show retries."""
    from pyspark import TaskContext

    context = TaskContext.get()
    return context.attemptNumber() if context is not None else 0


def records_digest(records: Iterable[dict]) -> str:
    """sha256 over the images' paths and sizes, in order: equal only for the same images in the same order."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record['path']}\0{record['bytes']}\n".encode())
    return digest.hexdigest()


def completed_shards(out: Location, shards: dict[int, list[dict]]) -> set[int]:
    """The planned shards already done: stats file present and readable, and every part holding the rows it says.

    A shard whose stats file exists but whose parts are missing, torn or disagree is not done: its stats file is
    deleted, so it is redone and a run killed while redoing it cannot mistake it for done.
    """
    present = set(list_names(out, out.join(sinks.SHARD_STATS)))
    candidates = [shard_id for shard_id in sorted(shards) if sinks.part_name(shard_id, ".json") in present]
    with ThreadPoolExecutor(max_workers=8) as pool:
        whole = dict(zip(candidates, pool.map(lambda i: _shard_is_whole(out, i, shards[i]), candidates)))
    for shard_id in candidates:
        if not whole[shard_id]:
            remove_tree(out, out.join(sinks.SHARD_STATS, sinks.part_name(shard_id, ".json")))
    return {shard_id for shard_id in candidates if whole[shard_id]}


def _shard_is_whole(out: Location, shard_id: int, records: list[dict]) -> bool:
    try:
        stats = sinks.read_json(out, f"{sinks.SHARD_STATS}/{sinks.part_name(shard_id, '.json')}")
        if (stats["shard_id"] != shard_id or stats["images"] != len(records)
                or stats["ok"] + stats["failed"] != len(records) or stats["images_sha256"] != records_digest(records)):
            return False
        expected = {sinks.FEATURES: stats["ok"], sinks.METADATA: stats["images"], sinks.ERRORS: stats["failed"]}
        return all(with_retries(lambda d=directory: sinks.parquet_rows(out, d, sinks.part_name(shard_id))) == rows
                   for directory, rows in expected.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def remove_partial_writes(out: Location) -> list[str]:
    """Delete the temp files killed writers left in a local run folder; returns their paths.

    Readers already skip them (hidden names, not `.parquet`); removing them keeps the folder clean. Object
    stores need nothing: an object is written in one PUT or not at all.
    """
    if not out.is_local:
        return []
    removed = []
    for directory, _, names in os.walk(out.path):
        for name in names:
            if _PARTIAL_WRITE.match(name):
                path = os.path.join(directory, name)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    removed.append(path)
    return removed


def executor_identity() -> dict:
    """Which Spark executor ran this code: its id when Spark says, plus host and process ids."""
    executor_id = os.environ.get("SPARK_EXECUTOR_ID") or _executor_id_from_workdir()
    return {"executor_id": executor_id, "host": socket.gethostname(), "pid": os.getpid()}


def _executor_id_from_workdir() -> str:
    """Standalone executors run in `<worker dir>/<app id>/<executor id>`; a local run has one executor, 'driver'."""
    cwd = os.getcwd()
    parent, name = os.path.split(cwd)
    if name.isdigit() and os.path.basename(parent).startswith("app-"):
        return name
    return "driver"


def shard_records(batches: Iterable[pd.DataFrame]) -> dict[int, list[dict]]:
    """Group the image rows of a Spark partition by shard id (a partition normally holds exactly one shard)."""
    shards: dict[int, list[dict]] = {}
    for frame in batches:
        for row in frame.to_dict("records"):
            shards.setdefault(int(row["shard_id"]), []).append(row)
    return shards
