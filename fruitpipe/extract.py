"""The work of one shard, run inside a Spark task: read bytes -> decode + resize -> ONNX batches -> write.
Images reach the graph as uint8 pixels, which it normalises (fruitpipe's exports), or as normalised float tensors
(graphs exported before): the runtime's input name says which.

Reads and decodes run in a few daemon threads ahead of inference (PIL and the network release the GIL), bounded
so memory stays flat; one that hangs past the read timeout is abandoned (`prefetch`) and loaded again later. Every
image ends as a features row or an error row with its stage (retryable when it timed out); the shard's outputs are
written whole, and its stats file, written last, marks it done.
On resume a shard counts as done only when its stats file, its parts and its planned images agree (`RunFolder.resume_shard`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from fruitpipe import sinks
from fruitpipe.images import (ImageDecodeError, Preprocessing, decode_rgb, image_format, image_size, normalise,
                              square_pixels)
from fruitpipe.inference import extract_features, runtime_for
from fruitpipe.models.specs import ONNX_PIXELS
from fruitpipe.prefetch import Job, Loaded, prefetched
from fruitpipe.records import ImageRow, ShardStats, records_digest
from fruitpipe.run_folder import RunFolder, ShardTables
from fruitpipe.storage import Location, StorageUnavailable, locate, read_bytes

# Images decoded ahead of inference, at least: enough to keep io_threads busy and hide object-store latency.
PREFETCH_IMAGES = 32
# Pause before loading timed-out images again (doubled for each further attempt): a stalled store gets time back.
RETRY_PAUSE_S = 2.0
# What ShardTimer times, as each shard's stats name them (stats written before "resize" was timed apart lack it).
PHASES = ("read", "decode", "resize", "infer", "write")
# The key columns of the features part, taken from the image rows.
_KEYS_SCHEMA = pa.schema(sinks.KEY_FIELDS)


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
    read_attempts: int = 3
    # The run's precision and its runtime, resolved on the driver (never "auto"): every shard computes alike.
    precision: str = "fp32"
    runtime: str = "onnxruntime"
    io_threads: int = 4


@dataclass
class ShardTimer:
    """Seconds spent per phase inside one shard (the loaders' phases overlap inference, so they do not add up):
    read (bytes), decode (bytes -> RGB image), resize (-> the graph's input: square pixels, normalised too for a
    graph that takes floats), infer, write.

    The loader threads add to read, decode and resize concurrently, hence the lock.
    """

    read: float = 0.0
    decode: float = 0.0
    resize: float = 0.0
    infer: float = 0.0
    write: float = 0.0
    wall: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            setattr(self, phase, getattr(self, phase) + seconds)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the block's wall time to `phase`, also when it raises."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - started)

    def seconds(self) -> dict[str, float]:
        return {phase: getattr(self, phase) for phase in (*PHASES, "wall")}


def _load(source: Location, prep: Preprocessing, normalised: bool, timer: ShardTimer, job: Job) -> Loaded:
    started = time.perf_counter()
    try:
        data = read_bytes(source, source.join(job.record.path))
    except FileNotFoundError:
        return Loaded(stage="read", reason="file vanished after listing (not found)")
    except PermissionError as exc:
        return Loaded(stage="read", reason=f"permission denied: {exc.strerror or exc}")
    except StorageUnavailable:
        raise
    except Exception as exc:
        return Loaded(stage="read", reason=f"{type(exc).__name__}: {exc}")
    finally:
        timer.add("read", time.perf_counter() - started)
    job.stage = "decode"
    try:
        with timer.timed("decode"):
            image, (width, height) = decode_rgb(data, target_size=prep.size)
            stored_format = image_format(data)
        with timer.timed("resize"):
            pixels = square_pixels(image, prep)
            tensor = normalise(pixels, prep) if normalised else pixels
    except ImageDecodeError as exc:
        header = image_size(data)
        return Loaded(width=header[0] if header else 0, height=header[1] if header else 0,
                      image_format=header[2] if header else "", stage="decode", reason=str(exc))
    except Exception as exc:
        return Loaded(stage="decode", reason=f"{type(exc).__name__}: {exc}")
    return Loaded(tensor, width, height, stored_format)


def process_shard(shard_id: int, records: list[ImageRow], settings: ExtractionSettings,
                  load_model_bytes: Callable[[], bytes]) -> ShardStats:
    """Extract features for one shard's images and write its outputs; returns the shard's stats.

    An image whose load timed out is loaded again, up to settings.read_attempts times in all, after a pause: a
    timeout says the storage stalled, not that the image is bad. One still failing that way is written as a
    retryable error row, and the stats count it, so the shard is not done and the next run retries it.
    """
    wall_started = time.perf_counter()
    timer = ShardTimer()
    source = locate(settings.source)
    runtime = runtime_for(settings.model_key, load_model_bytes, settings.threads, precision=settings.precision,
                          runtime=settings.runtime, batch_size=settings.batch_size)
    load = functools.partial(_load, source, settings.preprocessing, runtime.input_name != ONNX_PIXELS, timer)
    ok_rows: list[ImageRow] = []
    ok_vectors: list[np.ndarray] = []
    outcomes: dict[str, Loaded] = {}
    batch: list[tuple[ImageRow, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        started = time.perf_counter()
        try:
            vectors = extract_features(runtime, np.stack([tensor for _, tensor in batch]))
        except Exception as exc:
            for record, _ in batch:
                loaded = outcomes[record.image_id]
                outcomes[record.image_id] = dataclasses.replace(loaded, stage="infer",
                                                                reason=f"{type(exc).__name__}: {exc}")
        else:
            ok_rows.extend(record for record, _ in batch)
            ok_vectors.append(vectors)
        timer.add("infer", time.perf_counter() - started)
        batch.clear()

    pending = records
    for attempt in range(1, settings.read_attempts + 1):
        if attempt > 1:
            time.sleep(RETRY_PAUSE_S * 2 ** (attempt - 2))
        retry = []
        for record, loaded in prefetched(pending, load, threads=settings.io_threads,
                                         window=max(2 * settings.batch_size, PREFETCH_IMAGES),
                                         timeout_s=settings.read_timeout_s):
            outcomes[record.image_id] = dataclasses.replace(loaded, tensor=None)
            if loaded.tensor is not None:
                batch.append((record, loaded.tensor))
                if len(batch) == settings.batch_size:
                    flush()
            elif loaded.retryable:
                retry.append(record)
        flush()
        pending = retry
        if not pending:
            break

    metadata_rows = [_metadata_row(record, outcomes[record.image_id]) for record in records]
    error_rows = [_error(record, outcomes[record.image_id]) for record in records if outcomes[record.image_id].stage]
    started = time.perf_counter()
    features = np.concatenate(ok_vectors) if ok_vectors else np.zeros((0, 0), dtype=np.float32)
    keys = pa.Table.from_pylist([record.to_dict() for record in ok_rows], schema=_KEYS_SCHEMA)
    tables = ShardTables(features=sinks.vectors_table(keys, "features", features),
                         metadata=pa.Table.from_pylist(metadata_rows, schema=sinks.METADATA_SCHEMA),
                         errors=pa.Table.from_pylist(error_rows, schema=sinks.ERRORS_SCHEMA))

    def stats() -> ShardStats:
        """Called once the parts are written, so the stats count the time the writes took."""
        timer.add("write", time.perf_counter() - started)
        timer.wall = time.perf_counter() - wall_started
        return ShardStats(shard_id=shard_id, images=len(records), ok=len(ok_rows), failed=len(error_rows),
                          retryable=sum(row["retryable"] for row in error_rows),
                          feature_dim=int(features.shape[1]) if features.size else 0,
                          images_sha256=records_digest(records), task_attempt=_task_attempt(),
                          seconds=timer.seconds(), runtime=runtime.info(), executor=executor_identity(),
                          finished_at=time.time())

    return RunFolder(settings.output).write_shard(shard_id, tables, stats)


def _metadata_row(record: ImageRow, loaded: Loaded) -> dict:
    status = "ok" if not loaded.stage else ("retryable" if loaded.retryable else "failed")
    return {"image_id": record.image_id, "path": record.path, "label": record.label, "split": record.split,
            "width": loaded.width, "height": loaded.height, "bytes": record.bytes, "format": loaded.image_format,
            "status": status}


def _error(record: ImageRow, loaded: Loaded) -> dict:
    return {"image_id": record.image_id, "path": record.path, "label": record.label,
            "stage": loaded.stage, "reason": loaded.reason[:500], "retryable": loaded.retryable}


def _task_attempt() -> int:
    """Spark's attempt number of the running task (0 on the first try), kept in the stats to show retries."""
    from pyspark import TaskContext

    context = TaskContext.get()
    return context.attemptNumber() if context is not None else 0


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
