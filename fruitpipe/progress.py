"""Driver-side progress of the extraction stage, read from the run folder's shard stats files.

Each shard writes its stats file last, so the files present are exactly the shards done; this works the same on
a local disk, a cluster and S3 (one listing per poll plus one read per newly finished shard). Progress is a
tqdm bar when stderr is a terminal (and tqdm, a driver extra, is installed), else a plain line every ~10 s and
at the end.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TextIO

from fruitpipe.records import ShardStats
from fruitpipe.run_folder import RunFolder

POLL_SECONDS = 2.0
LOG_EVERY_SECONDS = 10.0


@dataclass
class Counts:
    """Images and shards done so far; `new_images` excludes resumed shards, so rates reflect this run's work."""

    images_done: int = 0
    new_images: int = 0
    failed: int = 0
    shards_done: int = 0


class ExtractionProgress:
    """Polls the shard stats files from a driver thread and shows images done / total, images/s, ETA, errors.

    Use as a context manager around the extraction stage; with `quiet` it does nothing at all.
    """

    def __init__(self, output: str, shard_images: Mapping[int, int], resumed: Collection[int], quiet: bool = False,
                 stream: TextIO | None = None, poll_seconds: float = POLL_SECONDS,
                 log_every_seconds: float = LOG_EVERY_SECONDS) -> None:
        self.output = output
        self.shard_images = dict(shard_images)
        self.resumed = set(resumed) & set(self.shard_images)
        self.quiet = quiet
        self.stream = stream
        self.poll_seconds = poll_seconds
        self.log_every_seconds = log_every_seconds
        self.total = sum(self.shard_images.values())
        self.counts = Counts()
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._folder: RunFolder | None = None
        self._bar: Any = None
        self._started = 0.0
        self._last_line = 0.0

    def __enter__(self) -> ExtractionProgress:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop(finished=exc_type is None)

    def start(self) -> None:
        if self.quiet:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        self.stream = stream
        self._folder = RunFolder(self.output)
        self._started = time.monotonic()
        resumed_images = sum(self.shard_images[shard_id] for shard_id in self.resumed)
        self.counts.images_done = resumed_images
        self.counts.shards_done = len(self.resumed)
        tqdm = _tqdm() if _is_terminal(stream) else None
        if tqdm is not None:
            self._bar = tqdm(total=self.total, initial=resumed_images, unit="img", desc="extract", file=stream,
                             smoothing=0.1)
        else:
            self._write(f"fruitpipe extract: {self.total} images in {_plural(len(self.shard_images), 'shard')}, "
                        f"{len(self.resumed)} resumed ({resumed_images} images)")
            self._last_line = self._started
        self._thread = threading.Thread(target=self._loop, name="fruitpipe-progress", daemon=True)
        self._thread.start()

    def stop(self, finished: bool = True) -> None:
        """Stop polling, take one last reading so the final numbers are exact, and close the bar or log."""
        if self.quiet or self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._poll()
        if self._bar is not None:
            self._bar.set_postfix_str(self._errors_text(), refresh=False)
            self._bar.close()
            self._bar = None
        else:
            self._write(self.line(final=True, finished=finished))

    def line(self, final: bool = False, finished: bool = True) -> str:
        """One plain progress line: done / total, rate over this run's new images, ETA, errors, shards."""
        counts = self.counts
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rate = counts.new_images / elapsed
        percent = 100.0 * counts.images_done / self.total if self.total else 100.0
        head = f"{counts.images_done}/{self.total} images ({percent:.0f}%)"
        shards = f"{counts.shards_done}/{len(self.shard_images)} shards"
        if final:
            state = "done" if finished else "stopped"
            return (f"fruitpipe extract {state}: {head}, {rate:.1f} images/s, {_duration(elapsed)}, "
                    f"{self._errors_text()}, {shards}")
        remaining = self.total - counts.images_done
        eta = f"ETA {_duration(remaining / rate)}" if rate > 0 else "ETA ?"
        return (f"fruitpipe extract: {head}, {_duration(elapsed)} elapsed, {rate:.1f} images/s, {eta}, "
                f"{self._errors_text()}, {shards}")

    def _errors_text(self) -> str:
        return _plural(self.counts.failed, "error")

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._poll()
            if self._bar is None and time.monotonic() - self._last_line >= self.log_every_seconds:
                self._write(self.line())
                self._last_line = time.monotonic()

    def _poll(self) -> None:
        """Read the stats files of shards that finished since the last poll."""
        assert self._folder is not None
        try:
            fresh = (self._folder.finished_shards() & set(self.shard_images)) - self._seen
            for shard_id in sorted(fresh):
                self._count(shard_id, self._folder.shard_stats(shard_id))
        except Exception:
            # Progress is advisory: a failed listing or read must never fail the run; the next poll retries.
            return

    def _count(self, shard_id: int, stats: ShardStats) -> None:
        self._seen.add(shard_id)
        self.counts.failed += stats.failed
        if shard_id in self.resumed:
            return
        images = stats.images
        self.counts.images_done += images
        self.counts.new_images += images
        self.counts.shards_done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(self._errors_text(), refresh=False)
            self._bar.update(images)

    def _write(self, text: str) -> None:
        assert self.stream is not None
        print(text, file=self.stream, flush=True)


def _tqdm() -> Any:
    """tqdm's bar class, or None where it is not installed (executors, EMR nodes): plain lines do instead."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return None
    return tqdm


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
