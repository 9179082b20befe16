"""Loading images ahead of their consumer on a few daemon threads, in input order, with a per-image timeout.

Used by a shard's extraction and by the inventory. A load that hangs (a stuck mount, a network read with no
deadline, a file swapped for a FIFO) is abandoned, never joined: neither the caller nor the process's exit waits
for it, and the caller stays interruptible (Ctrl-C).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np

from fruitpipe.storage import StorageUnavailable

# What one load is about: an extraction's ImageRow, an inventory's file record.
Record = TypeVar("Record")

# More hung loads than this in one pass means the storage hangs, not one file.
MAX_HUNG_READS = 8


@dataclass
class Loaded:
    """One image's load: its tensor (when preprocessed) and stored size and format, or the stage and reason it
    failed (stage '' means it loaded). `retryable`: the failure says nothing about the image (it timed out), so
    another attempt may load it."""

    tensor: np.ndarray | None = None
    width: int = 0
    height: int = 0
    image_format: str = ""
    stage: str = ""
    reason: str = ""
    retryable: bool = False


@dataclass(eq=False)
class Job(Generic[Record]):
    """One image's load as the prefetcher tracks it: which stage it is in, since when, and its result."""

    record: Record
    stage: str = "read"
    started: float | None = None
    result: Loaded | None = None
    abandoned: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class HungReadsError(RuntimeError):
    """Many loads hung: the storage is at fault, not single images (a shard's task fails so Spark retries it)."""


def prefetched(records: list[Record], load: Callable[[Job[Record]], Loaded], threads: int, window: int,
               timeout_s: float, max_hung: int = MAX_HUNG_READS) -> Iterator[tuple[Record, Loaded]]:
    """Loads in input order, up to `window` ahead on `threads` daemon threads.

    A load running longer than timeout_s (a hung network read, a FIFO, a pathological file) becomes a failed
    Loaded; its thread is abandoned, never joined, and replaced, so neither the caller nor the process's exit waits
    for it. More than `max_hung` hung loads raise HungReadsError.
    """
    lock = threading.Lock()
    jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
    closed = threading.Event()

    def work() -> None:
        while (job := jobs.get()) is not None:
            if closed.is_set():
                continue
            with lock:
                job.started = time.monotonic()
            try:
                loaded: Loaded | StorageUnavailable = load(job)
            except StorageUnavailable as exc:
                loaded = exc
            with lock:
                job.result = loaded
                job.done.set()
                if job.abandoned:
                    return

    def start_thread() -> None:
        threading.Thread(target=work, name="fruitpipe-load", daemon=True).start()

    def outcome(job: Job) -> Loaded | None:
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

    pending: deque[Job] = deque()
    upcoming = iter(records)

    def submit_next() -> None:
        record = next(upcoming, None)
        if record is not None:
            pending.append(job := Job(record))
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
                loaded = Loaded(stage=job.stage, reason=f"timed out after {timeout_s:g} s {action}", retryable=True)
            submit_next()
            yield job.record, loaded
    finally:
        closed.set()
        for _ in range(threads):
            jobs.put(None)
