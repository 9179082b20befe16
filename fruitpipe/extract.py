"""The work of one shard, run inside a Spark task: read bytes -> decode + resize -> ONNX batches -> write.

Reads and decodes run in a small thread pool ahead of inference (PIL and the network release the GIL), bounded
so memory stays flat. Every image ends as a features row or an error row with its stage; the shard's outputs
are written whole, and its stats file, written last, marks it done for resume.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from fruitpipe import sinks
from fruitpipe.images import ImageDecodeError, Preprocessing, image_size, preprocess
from fruitpipe.inference import extract_features, session_for
from fruitpipe.storage import Location, locate, read_bytes

IMAGE_COLUMNS = ["image_id", "path", "label", "label_index", "split", "bytes", "shard_id"]


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


def _load(source: Location, record: dict, prep: Preprocessing, timer: ShardTimer) -> _Loaded:
    started = time.perf_counter()
    try:
        data = read_bytes(source, source.join(record["path"]))
    except FileNotFoundError:
        return _Loaded(stage="read", reason="file vanished after listing (not found)")
    except PermissionError as exc:
        return _Loaded(stage="read", reason=f"permission denied: {exc.strerror or exc}")
    except Exception as exc:
        return _Loaded(stage="read", reason=f"{type(exc).__name__}: {exc}")
    finally:
        timer.read += time.perf_counter() - started
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


def _prefetched(records: list[dict], load: Callable[[dict], _Loaded], pool: ThreadPoolExecutor,
                window: int, timeout_s: float) -> Iterator[tuple[dict, _Loaded]]:
    """Loads in input order with at most `window` in flight; a load slower than timeout_s becomes an error."""
    pending: deque[tuple[dict, Future[_Loaded]]] = deque()
    upcoming = iter(records)
    for record in upcoming:
        pending.append((record, pool.submit(load, record)))
        if len(pending) >= window:
            break
    while pending:
        record, future = pending.popleft()
        try:
            loaded = future.result(timeout=timeout_s)
        except FutureTimeout:
            future.cancel()
            loaded = _Loaded(stage="read", reason=f"timed out after {timeout_s:g} s reading or decoding")
        next_record = next(upcoming, None)
        if next_record is not None:
            pending.append((next_record, pool.submit(load, next_record)))
        yield record, loaded


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

    pool = ThreadPoolExecutor(max_workers=settings.io_threads, thread_name_prefix=f"shard{shard_id}-load")
    try:
        loaded_stream = _prefetched(records, lambda record: _load(source, record, settings.preprocessing, timer),
                                    pool, window=2 * settings.batch_size, timeout_s=settings.read_timeout_s)
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
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

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
