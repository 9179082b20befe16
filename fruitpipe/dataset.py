"""Listing a Fruits-360-style folder (`<split>/<class>/<file>`) and choosing the images a run takes.

Labels are folder names. Listing is one flat (recursive) listing of the source, which on S3 is a paged prefix
listing (1,000 keys a call) rather than one call per class folder.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections import defaultdict
from dataclasses import dataclass

from fruitpipe.config import SPLITS, Selection
from fruitpipe.errors import FruitpipeError
from fruitpipe.storage import find_files, locate

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")




@dataclass(frozen=True)
class ImageRecord:
    """One listed image: `path` is relative to the source root and is the stable key of every output row;
    `version` (mtime or ETag) is part of its identity on resume, so a file rewritten in place is not stale."""

    image_id: str
    path: str
    label: str
    split: str
    bytes: int
    version: str


@dataclass(frozen=True)
class UnlistedFile:
    """A file a run cannot take as an image, with its class folder ('' when in none) and why: it becomes a
    `list` error row."""

    path: str
    label: str
    reason: str


@dataclass(frozen=True)
class Listing:
    """What a source holds for one split: the images, the files that cannot be images (with why), and how many
    hidden files (name starting with '.') were skipped."""

    source: str
    split: str
    images: list[ImageRecord]
    other_files: list[UnlistedFile]
    hidden_files: int = 0


def split_and_class(relative_path: str) -> tuple[str, str]:
    """Where a path relative to the source root sits: `<split>/<class>/...` when its first folder is a split
    (Training, Test), else `<class>/...`; '' for a part it has not (a file loose in the split or the root)."""
    parts = relative_path.split("/")
    split = parts[0] if parts[0] in SPLITS else ""
    in_split = parts[1:] if split else parts
    return split, in_split[0] if len(in_split) >= 2 else ""


def image_id_for(relative_path: str) -> str:
    """A stable id from the path relative to the source: equal for the same image on disk or in S3."""
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16]


def list_split(source: str, split: str) -> Listing:
    """List `<source>/<split>/<class>/*` images; a source without split folders is read as one split.

    Nothing in the split is dropped silently: hidden files are counted, and every other file outside a usable
    class folder (loose in the split folder, in a hidden folder, in a folder beside the split folders, not a
    regular file) is an UnlistedFile with its reason. The other split's files are simply not this run's.
    """
    location = locate(source)
    files = find_files(location, location.path)
    if not files:
        raise FruitpipeError(f"source {source} is missing or empty")
    prefix = location.path.rstrip("/") + "/"
    relative = {path[len(prefix):]: entry for path, entry in files.items() if path.startswith(prefix)}
    has_splits = any(path.split("/", 1)[0] in SPLITS for path in relative)
    images: list[ImageRecord] = []
    other_files: list[UnlistedFile] = []
    hidden_files = 0
    for path, entry in sorted(relative.items()):
        parts = path.split("/")
        path_split, label = split_and_class(path)
        if path_split and path_split != split:
            continue
        if parts[-1].startswith(".") or (has_splits and parts[0].startswith(".")):
            hidden_files += 1  # .DS_Store, editor temp files; and .git, .cache beside the split folders
            continue
        if has_splits and not path_split:
            other_files.append(UnlistedFile(path, "", "not in a split folder (Training/Test)"))
            continue
        if not label:
            other_files.append(UnlistedFile(path, "", "not in a class folder"))
            continue
        in_split = parts[1:] if has_splits else parts
        hidden_folder = next((part for part in in_split[:-1] if part.startswith(".")), None)
        if hidden_folder is not None:
            other_files.append(UnlistedFile(path, label, f"in a hidden folder ({hidden_folder}): rename it to "
                                                         "include its images"))
        elif entry.problem:
            other_files.append(UnlistedFile(path, label, entry.problem))
        elif path.lower().endswith(IMAGE_SUFFIXES):
            images.append(ImageRecord(image_id_for(path), path, label, split if has_splits else "", entry.size,
                                      entry.version))
        else:
            other_files.append(UnlistedFile(path, label, "not an image file (unsupported file suffix)"))
    if not images:
        where = f"{source}/{split}" if has_splits else source
        raise FruitpipeError(f"no images found under {where} (expected <class>/*.jpg folders)")
    return Listing(source=source, split=split, images=images, other_files=other_files, hidden_files=hidden_files)


def select(images: list[ImageRecord], selection: Selection) -> list[ImageRecord]:
    """Apply class globs, then a per-class cap, then a total limit spread evenly over classes (deterministic)."""
    by_class: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in images:
        if not selection.classes or any(fnmatch.fnmatchcase(record.label, glob) for glob in selection.classes):
            by_class[record.label].append(record)
    if not by_class:
        raise FruitpipeError(f"no class matches {', '.join(selection.classes)}")
    for label in by_class:
        by_class[label].sort(key=lambda record: record.path)
        if selection.per_class is not None:
            by_class[label] = by_class[label][: selection.per_class]
    if selection.limit is None:
        chosen = [record for label in sorted(by_class) for record in by_class[label]]
    else:
        chosen = _round_robin(by_class, selection.limit)
    return sorted(chosen, key=lambda record: record.path)


def _round_robin(by_class: dict[str, list[ImageRecord]], limit: int) -> list[ImageRecord]:
    """Take images class by class in turn, so a limit keeps every class represented."""
    chosen: list[ImageRecord] = []
    labels = sorted(by_class)
    depth = 0
    while len(chosen) < limit and any(depth < len(by_class[label]) for label in labels):
        for label in labels:
            if depth < len(by_class[label]) and len(chosen) < limit:
                chosen.append(by_class[label][depth])
        depth += 1
    return chosen


def label_indices(images: list[ImageRecord]) -> dict[str, int]:
    """Class name -> index in sorted order (the `label_index` column)."""
    return {label: index for index, label in enumerate(sorted({record.label for record in images}))}
