"""Step 1 of the study: what the source holds — one row per file, one per class, unreadable files flagged."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from fruitpipe import sinks
from fruitpipe.dataset import IMAGE_SUFFIXES, split_and_class
from fruitpipe.errors import FruitpipeError
from fruitpipe.images import ImageDecodeError, decode_rgb, image_size
from fruitpipe.prefetch import HungReadsError, Job, Loaded, prefetched
from fruitpipe.run_folder import RUN_MARKER
from fruitpipe.storage import (
    Location,
    StorageUnavailable,
    exists,
    find_files,
    locate,
    read_bytes,
)

IMAGES_CSV = "images.csv"
CLASSES_CSV = "classes.csv"
# The same default as `run --read-timeout`: a read or decode running longer is abandoned and reported.
READ_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class InventorySummary:
    files: int
    classes: int
    unreadable: int
    bytes: int
    images_csv: str
    classes_csv: str
    hidden_files: int = 0


def _load(source: Location, job: Job) -> Loaded:
    """Read and decode one file (small), as `prefetched` runs it: a hang is abandoned after the timeout."""
    try:
        data = read_bytes(source, job.record["full_path"])
    except StorageUnavailable:
        raise
    except Exception as exc:
        return Loaded(stage="read", reason=f"read: {type(exc).__name__}: {exc}")
    job.stage = "decode"
    header = image_size(data)
    width, height, image_format = header if header else (0, 0, "")
    try:
        decode_rgb(data, target_size=32)
    except Exception as exc:  # ImageDecodeError, or anything else a corrupt file provokes: a row, never a crash
        reason = str(exc) if isinstance(exc, ImageDecodeError) else f"{type(exc).__name__}: {exc}"
        return Loaded(width=width, height=height, image_format=image_format, stage="decode", reason=reason)
    return Loaded(width=width, height=height, image_format=image_format)


def _row(record: dict, loaded: Loaded | None) -> dict:
    split, label = split_and_class(record["path"])
    row = {"path": record["path"], "class": label, "split": split, "bytes": record["bytes"], "width": None, "height": None,
           "format": "", "readable": False, "reason": record["problem"]}
    if loaded is not None:
        row.update(width=loaded.width or None, height=loaded.height or None, format=loaded.image_format,
                   readable=not loaded.stage, reason=loaded.reason)
    return row


def build_inventory(source: str, output: str, threads: int = 16,
                    read_timeout_s: float = READ_TIMEOUT_S) -> InventorySummary:
    """Write images.csv and classes.csv for every file under `source` into `output`.

    Hidden files (name starting with '.') are counted, not listed. Files that are not regular (FIFOs, devices) are
    rows with their reason and are never opened; a read or decode that hangs is abandoned after read_timeout_s.
    """
    out = locate(output)
    _check_output(out, output)
    location = locate(source)
    files = find_files(location, location.path)
    if not files:
        raise FruitpipeError(f"source {source} is missing or empty")
    prefix = location.path.rstrip("/") + "/"
    records = [{"path": path[len(prefix):], "full_path": path, "bytes": entry.size, "problem": entry.problem}
               for path, entry in sorted(files.items()) if not path.rsplit("/", 1)[-1].startswith(".")]
    hidden = len(files) - len(records)
    readable = [record for record in records if not record["problem"]]
    try:
        loads = dict((record["path"], loaded) for record, loaded in
                     prefetched(readable, lambda job: _load(location, job), threads=threads, window=4 * threads,
                                timeout_s=read_timeout_s))
    except HungReadsError as exc:
        raise FruitpipeError(f"inventory of {source} stopped: {exc}") from None
    rows = [_row(record, loads.get(record["path"])) for record in records]
    for row in rows:
        if not row["readable"] and not row["reason"] and not row["path"].lower().endswith(IMAGE_SUFFIXES):
            row["reason"] = "not an image file"
    try:
        sinks.write_csv(out, IMAGES_CSV, pa.Table.from_pylist(rows))
        sinks.write_csv(out, CLASSES_CSV, pa.Table.from_pylist(_per_class(rows)))
    except OSError as exc:
        raise FruitpipeError(f"cannot write to inventory output {output}: {exc.strerror or exc}") from None
    return InventorySummary(files=len(rows), classes=len({(r["split"], r["class"]) for r in rows}),
                            unreadable=sum(not r["readable"] for r in rows), bytes=sum(r["bytes"] for r in rows),
                            images_csv=out.uri(out.join(IMAGES_CSV)), classes_csv=out.uri(out.join(CLASSES_CSV)),
                            hidden_files=hidden)


def _check_output(out: Location, output: str) -> None:
    """Refuse an output that is a file, or a run folder (its files would mix with the run's), before any work."""
    if out.call("isfile", out.path):
        raise FruitpipeError(f"inventory output {output} is a file; choose a folder")
    if exists(out, out.join(RUN_MARKER)):
        raise FruitpipeError(f"inventory output {output} is a fruitpipe run folder; choose another folder")


def _per_class(rows: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["split"], row["class"]), []).append(row)
    summary = []
    for (split, label), members in sorted(groups.items()):
        widths = [m["width"] for m in members if m["width"]]
        heights = [m["height"] for m in members if m["height"]]
        summary.append({"split": split, "class": label, "count": len(members),
                        "bytes": sum(m["bytes"] for m in members),
                        "min_width": min(widths, default=None), "max_width": max(widths, default=None),
                        "min_height": min(heights, default=None), "max_height": max(heights, default=None),
                        "unreadable": sum(not m["readable"] for m in members)})
    return summary
