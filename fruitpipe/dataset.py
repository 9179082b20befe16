"""Listing a Fruits-360-style folder (`<split>/<class>/<file>`) and choosing the images a run takes.

Labels are folder names. The driver lists only the source's top levels (`source_layout`: the split folder's class
folders); each class folder is then listed whole by a task (`list_part`: one flat, paged prefix listing on S3,
1,000 keys a call), in parallel, so the driver never holds a record per image. The selection works on the classes'
image counts (`quotas`), so it is decided on the driver without the images too.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from fruitpipe.config import SPLITS, Selection
from fruitpipe.errors import FruitpipeError
from fruitpipe.storage import ListedFile, find_files, list_folder, locate

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


@dataclass(frozen=True)
class SourcePart:
    """One top-level folder of the source that a task lists whole: a class folder of the split (its name is the
    label), or a folder beside the split folders (label ''), whose files are reported as not in a split."""

    number: int
    path: str
    label: str


@dataclass(frozen=True)
class SourceLayout:
    """The top of a source for one split, listed by the driver in one or two calls: the folders that tasks list
    (in path order), the loose files beside them and the hidden ones among those."""

    source: str
    split: str
    has_splits: bool
    parts: tuple[SourcePart, ...]
    other_files: tuple[UnlistedFile, ...]
    hidden_files: int

    def where(self) -> str:
        return f"{self.source}/{self.split}" if self.has_splits else self.source


@dataclass(frozen=True)
class PartListing:
    """What one part holds: its images (sorted by path), the files it cannot take as images, its hidden files."""

    images: list[ImageRecord]
    other_files: list[UnlistedFile]
    hidden_files: int


def source_layout(source: str, split: str) -> SourceLayout:
    """The source's top levels: the root and, when it has split folders, this split's folder (not the other
    split's). Every folder found there is a part, listed later by a task (`list_part`); what lies loose is
    classified here, by the same rules."""
    location = locate(source)
    root = location.path.rstrip("/")
    folders, files = list_folder(location, root)
    if not folders and not files:
        raise FruitpipeError(f"source {source} is missing or empty")
    names = [path.rsplit("/", 1)[-1] for path in [*folders, *files]]
    has_splits = any(name in SPLITS for name in names)
    part_paths = [path[len(root) + 1:] for path in folders]
    if has_splits:
        part_paths = [path for path in part_paths if path not in SPLITS]
        split_folders, split_files = (list_folder(location, f"{root}/{split}") if f"{root}/{split}" in folders
                                      else ([], {}))
        part_paths += [path[len(root) + 1:] for path in split_folders]
        files = {**files, **split_files}
    loose = [_classify(path[len(root) + 1:], entry, split, has_splits) for path, entry in sorted(files.items())]
    # Sorted by path + "/": every path in a part starts with it, so part order is the images' path order.
    ordered = sorted(part_paths, key=lambda path: path + "/")
    parts = tuple(SourcePart(number, path, split_and_class(path + "/_")[1] if _holds_classes(path, split, has_splits)
                             else "") for number, path in enumerate(ordered))
    return SourceLayout(source=source, split=split, has_splits=has_splits, parts=parts,
                        other_files=tuple(item for item in loose if isinstance(item, UnlistedFile)),
                        hidden_files=sum(1 for item in loose if item is _HIDDEN))


def _holds_classes(part_path: str, split: str, has_splits: bool) -> bool:
    return not has_splits or part_path.startswith(f"{split}/")


def list_part(layout: SourceLayout, part: SourcePart) -> PartListing:
    """List one part whole and classify every file in it (a task: on an executor, in the pool or a driver thread)."""
    location = locate(layout.source)
    root = location.path.rstrip("/")
    guards = (root, f"{root}/{layout.split}") if layout.has_splits and part.label else (root,)
    files = find_files(location, f"{root}/{part.path}", above=guards if location.is_local else ())
    images: list[ImageRecord] = []
    other_files: list[UnlistedFile] = []
    hidden = 0
    for path, entry in sorted(files.items()):
        item = _classify(path[len(root) + 1:], entry, layout.split, layout.has_splits)
        if isinstance(item, ImageRecord):
            images.append(item)
        elif isinstance(item, UnlistedFile):
            other_files.append(item)
        elif item is _HIDDEN:
            hidden += 1
    return PartListing(images, other_files, hidden)


_HIDDEN = object()  # a hidden file: counted, not listed
_OTHER_SPLIT = object()  # a file of the other split: not this run's


def _classify(path: str, entry: ListedFile, split: str, has_splits: bool) -> ImageRecord | UnlistedFile | object:
    """What one listed file is to a run of `split`: an image, a file it cannot take (with why), hidden, or the other
    split's. Nothing in the split is dropped silently: hidden files (.DS_Store, editor temp files; .git, .cache
    beside the split folders) are counted, every other file outside a usable class folder is reported."""
    parts = path.split("/")
    path_split, label = split_and_class(path)
    if path_split and path_split != split:
        return _OTHER_SPLIT
    if parts[-1].startswith(".") or (has_splits and parts[0].startswith(".")):
        return _HIDDEN
    if has_splits and not path_split:
        return UnlistedFile(path, "", "not in a split folder (Training/Test)")
    if not label:
        return UnlistedFile(path, "", "not in a class folder")
    in_split = parts[1:] if has_splits else parts
    hidden_folder = next((part for part in in_split[:-1] if part.startswith(".")), None)
    if hidden_folder is not None:
        return UnlistedFile(path, label, f"in a hidden folder ({hidden_folder}): rename it to include its images")
    if entry.problem:
        return UnlistedFile(path, label, entry.problem)
    if path.lower().endswith(IMAGE_SUFFIXES):
        return ImageRecord(image_id_for(path), path, label, split if has_splits else "", entry.size, entry.version)
    return UnlistedFile(path, label, "not an image file (unsupported file suffix)")


def selected_parts(layout: SourceLayout, selection: Selection) -> list[SourcePart]:
    """The parts a selection needs listed: the class folders its globs match (all without globs), and, when no
    class is chosen, the folders beside the split ones, whose files count as failed images."""
    chosen = [part for part in layout.parts if class_selected(part.label, selection)
              or (not part.label and not selection.classes)]
    if not any(part.label for part in chosen):
        if selection.classes:
            raise FruitpipeError(f"no class matches {', '.join(selection.classes)}")
        raise FruitpipeError(f"no images found under {layout.where()} (expected <class>/*.jpg folders)")
    return chosen


def class_selected(label: str, selection: Selection) -> bool:
    """Whether a class (folder name; '' for none) is one the selection's globs take (all, without globs)."""
    return bool(label) and (not selection.classes or any(fnmatch.fnmatchcase(label, glob)
                                                         for glob in selection.classes))


def quotas(counts: Mapping[str, int], selection: Selection) -> dict[str, int]:
    """How many images each class gives a selection, from the classes' image counts alone: all (or the per-class
    cap), then a total limit taken class by class in turn (sorted by name), so a limit keeps every class
    represented. Each class gives its first images by path, so the driver never needs the images themselves."""
    capped = {label: min(count, selection.per_class) if selection.per_class is not None else count
              for label, count in counts.items()}
    if selection.limit is None or selection.limit >= sum(capped.values()):
        return capped
    labels = sorted(capped)
    taken = dict.fromkeys(labels, 0)
    left = selection.limit
    while left:
        takers = [label for label in labels if taken[label] < capped[label]]
        depth_round = min(left, len(takers))
        for label in takers[:depth_round]:
            taken[label] += 1
        left -= depth_round
    return taken


def list_split(source: str, split: str) -> Listing:
    """The whole listing of one split in this process (the pipeline lists its parts in tasks instead): every
    image and every file it cannot take, as `source_layout` and `list_part` classify them."""
    layout = source_layout(source, split)
    images: list[ImageRecord] = []
    other_files = list(layout.other_files)
    hidden = layout.hidden_files
    for part in layout.parts:
        listed = list_part(layout, part)
        images += listed.images
        other_files += listed.other_files
        hidden += listed.hidden_files
    if not images:
        raise FruitpipeError(f"no images found under {layout.where()} (expected <class>/*.jpg folders)")
    return Listing(source=source, split=split, images=images, other_files=sorted(other_files, key=lambda f: f.path),
                   hidden_files=hidden)


def select(images: list[ImageRecord], selection: Selection) -> list[ImageRecord]:
    """Apply class globs, then a per-class cap, then a total limit spread evenly over classes (deterministic);
    the images in path order."""
    by_class: dict[str, list[ImageRecord]] = defaultdict(list)
    for record in images:
        if class_selected(record.label, selection):
            by_class[record.label].append(record)
    if not by_class:
        raise FruitpipeError(f"no class matches {', '.join(selection.classes)}")
    taken = quotas({label: len(records) for label, records in by_class.items()}, selection)
    chosen = [record for label, records in by_class.items()
              for record in sorted(records, key=lambda record: record.path)[:taken[label]]]
    return sorted(chosen, key=lambda record: record.path)


def label_indices(images: list[ImageRecord]) -> dict[str, int]:
    """Class name -> index in sorted order (the `label_index` column)."""
    return {label: index for index, label in enumerate(sorted({record.label for record in images}))}
