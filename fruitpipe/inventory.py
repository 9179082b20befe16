"""Step 1 of the study: what the source holds — one row per file, one per class, unreadable files flagged."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from fruitpipe import sinks
from fruitpipe.dataset import IMAGE_SUFFIXES
from fruitpipe.errors import FruitpipeError
from fruitpipe.images import ImageDecodeError, decode_rgb, image_size
from fruitpipe.storage import StorageUnavailable, find_files, locate, read_bytes

IMAGES_CSV = "images.csv"
CLASSES_CSV = "classes.csv"


@dataclass(frozen=True)
class InventorySummary:
    files: int
    classes: int
    unreadable: int
    bytes: int
    images_csv: str
    classes_csv: str


def _inspect(source, path: str, relative: str, size: int) -> dict:
    parts = relative.split("/")
    has_split = parts[0] in ("Training", "Test") and len(parts) >= 3
    row = {"path": relative, "class": parts[1] if has_split else (parts[0] if len(parts) > 1 else ""),
           "split": parts[0] if has_split else "", "bytes": size, "width": None, "height": None,
           "format": "", "readable": False, "reason": ""}
    try:
        data = read_bytes(source, path)
    except StorageUnavailable:
        raise
    except Exception as exc:
        row["reason"] = f"read: {type(exc).__name__}: {exc}"
        return row
    header = image_size(data)
    if header:
        row["width"], row["height"], row["format"] = header
    try:
        decode_rgb(data, target_size=32)
        row["readable"] = True
    except ImageDecodeError as exc:
        row["reason"] = str(exc)
    return row


def build_inventory(source: str, output: str, threads: int = 16) -> InventorySummary:
    """Write images.csv and classes.csv for every file under `source` into `output`."""
    location = locate(source)
    files = find_files(location, location.path)
    if not files:
        raise FruitpipeError(f"source {source} is missing or empty")
    prefix = location.path.rstrip("/") + "/"
    entries = sorted((path, path[len(prefix):], size) for path, size in files.items()
                     if not any(part.startswith(".") for part in path[len(prefix):].split("/")))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        rows = list(pool.map(lambda entry: _inspect(location, *entry), entries))
    for row in rows:
        if not row["readable"] and not row["reason"] and not row["path"].lower().endswith(IMAGE_SUFFIXES):
            row["reason"] = "not an image file"
    out = locate(output)
    sinks.write_csv(out, IMAGES_CSV, pa.Table.from_pylist(rows))
    sinks.write_csv(out, CLASSES_CSV, pa.Table.from_pylist(_per_class(rows)))
    return InventorySummary(files=len(rows), classes=len({(r["split"], r["class"]) for r in rows}),
                            unreadable=sum(not r["readable"] for r in rows), bytes=sum(r["bytes"] for r in rows),
                            images_csv=out.uri(out.join(IMAGES_CSV)), classes_csv=out.uri(out.join(CLASSES_CSV)))


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
