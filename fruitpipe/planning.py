"""The run's shard plan, made by tasks, so the driver holds per-class and per-shard counts, never a record per image.

The driver lists the source's top levels (`dataset.source_layout`); then one task per class folder (a part) runs
each pass on the given Distributor (Spark, or the local pool on a local master):

1. list: the task lists its folder whole, writes its images (sorted by path) into the run folder as a listing
   part and returns counts, and the few files it cannot take as images.
2. diff (a stored plan only): the task takes its class's quota of images (`dataset.quotas`, decided on the driver
   from the counts) and compares them with the stored plan's part of the same folder: how many images each stored
   shard keeps, how many are new. An image stays in its shard only with the same path, size and version.
3. write: the task writes its plan part: every taken image with its shard (kept ones keep theirs; new ones get
   shards numbered after every earlier one, from the offset the driver computed over all parts' new counts) and
   returns a digest of the part.

Shards are runs of shard_size images in path order, crossing class folders: the same cut as a plan made of the
whole listing at once, so a fresh plan equals today's selection and shards whatever the source's size. The driver
writes plan.json last (`RunFolder.write_plan`); it names the parts and holds, per shard, its image count,
generation and the parts it reads (`records.PlannedShard`). Shard tasks read their own rows (`RunFolder.shard_rows`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pyarrow as pa

from fruitpipe.config import Selection, auto_shard_size
from fruitpipe.dataset import (
    ImageRecord,
    SourceLayout,
    SourcePart,
    UnlistedFile,
    class_selected,
    list_part,
    quotas,
)
from fruitpipe.distributors import Distributor
from fruitpipe.errors import FruitpipeError
from fruitpipe.records import PlannedShard, PlanPart, ShardPlan
from fruitpipe.run_folder import RunFolder

_LISTING_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("label", pa.string()),
                             ("split", pa.string()), ("bytes", pa.int64()), ("version", pa.string())])
PLAN_ROWS_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("label", pa.string()),
                              ("label_index", pa.int64()), ("split", pa.string()), ("bytes", pa.int64()),
                              ("shard_id", pa.int64()), ("version", pa.string()), ("generation", pa.int64())])


@dataclass(frozen=True)
class PlannedRun:
    """A run's plan and what its listing found besides: the files it cannot take as images that count as failed
    (only when the selection takes every image of their class), and the hidden files skipped."""

    plan: ShardPlan
    unlisted: list[UnlistedFile]
    hidden_files: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return self.plan.images


@dataclass(frozen=True)
class _PartCount:
    number: int
    images: int
    other_files: list[UnlistedFile]
    hidden_files: int


@dataclass(frozen=True)
class _PartDiff:
    number: int
    kept: dict[int, int]
    added: int


@dataclass(frozen=True)
class _Context:
    """What every task of one planning needs (picklable, the same size however many parts): where to read and
    write. `layout` is the source's layout without its parts."""

    output: str
    layout: SourceLayout
    listing: str
    rows: str
    stored_rows: str | None


@dataclass(frozen=True)
class _PartTask:
    """One part's item in the diff and write passes: its quota, and its number in the stored plan (None: new)."""

    part: SourcePart
    quota: int
    stored_number: int | None


@dataclass(frozen=True)
class _Numbering:
    """How a part numbers its new images: the first new shard id, the new shards' size, the generation, the part's
    offset among all new images, and the label index of its class."""

    first_shard_id: int
    shard_size: int
    generation: int
    offset: int
    label_index: int


def plan_run(distributor: Distributor, folder: RunFolder, layout: SourceLayout, parts: list[SourcePart],
             selection: Selection, shard_size: int | None, stored: ShardPlan | None,
             spread_new_images: bool) -> PlannedRun:
    """The run's shard plan, stored in `folder`: a fresh one (generation 0, `shard_size` None: auto's for the
    selection's size), the stored one when the selection is unchanged (a resume), or the stored one grown by a
    generation: images no longer selected (removed, or changed in place) leave their shards, new ones fill new
    shards numbered after every earlier one; no existing shard gains an image. With `spread_new_images` (the shard
    size is auto's) the new images spread over as many shards as a fresh run of them would, so a small growth still
    keeps every core busy. `parts` are the layout's parts the selection lists (`dataset.selected_parts`).
    label_index is per run: kept for every class once given; a new class takes the next one.
    """
    listing, rows = folder.new_plan_names()
    context = _Context(folder.output, dataclasses.replace(layout, parts=(), other_files=()), listing, rows,
                       stored.rows if stored else None)
    stored_parts = {part.path: part.number for part in stored.parts} if stored else {}
    started = time.perf_counter()
    counts = distributor.map(partial(_list_part, context=context), parts)
    listed = time.perf_counter()
    unlisted = [file for count in counts for file in count.other_files if _counts_as_failed(file, selection)]
    unlisted = sorted([*unlisted, *(f for f in layout.other_files if _counts_as_failed(f, selection))],
                      key=lambda file: file.path)
    hidden = layout.hidden_files + sum(count.hidden_files for count in counts)
    by_number = {part.number: part for part in parts}
    taken = quotas({by_number[c.number].label: c.images for c in counts if by_number[c.number].label}, selection)
    quota = {part.number: taken.get(part.label, 0) for part in parts}
    if not sum(quota.values()):
        raise FruitpipeError(f"no images found under {layout.where()} (expected <class>/*.jpg folders)")
    try:
        tasks = {part.number: _PartTask(part, quota[part.number], stored_parts.get(part.path)) for part in parts}
        plan = _planned(distributor, folder, context, parts, tasks, shard_size, stored, spread_new_images)
    finally:
        folder.remove_plan_listing(listing)
    return PlannedRun(plan, unlisted, hidden, {"list": listed - started, "plan": time.perf_counter() - listed})


def _planned(distributor: Distributor, folder: RunFolder, context: _Context, parts: list[SourcePart],
             tasks: dict[int, _PartTask], shard_size: int | None, stored: ShardPlan | None,
             spread_new_images: bool) -> ShardPlan:
    if stored is None:
        diffs = [_PartDiff(task.part.number, {}, task.quota) for task in tasks.values() if task.quota]
    else:
        compared = [task for task in tasks.values() if task.quota or task.stored_number is not None]
        diffs = distributor.map(partial(_diff_part, context=context), compared)
    added = {diff.number: diff.added for diff in diffs}
    kept: dict[int, int] = {}
    holders: dict[int, set[int]] = {}
    for diff in diffs:
        for shard_id, count in diff.kept.items():
            kept[shard_id] = kept.get(shard_id, 0) + count
            holders.setdefault(shard_id, set()).add(diff.number)
    total_added = sum(added.values())
    removed = stored.images - sum(kept.values()) if stored is not None else 0
    if stored is not None and not total_added and not removed:
        return stored
    label_of = {part.number: part.label for part in parts}
    if stored is None:
        labels = {label: index for index, label in enumerate(sorted({label_of[n] for n, a in added.items() if a}))}
        size = shard_size or auto_shard_size(total_added)
        new_size, first, generation = size, 0, 0
    else:
        labels = dict(stored.labels)
        for label in sorted({label_of[n] for n, a in added.items() if a} - set(labels)):
            labels[label] = max(labels.values(), default=-1) + 1
        size = stored.shard_size
        new_size = min(size, auto_shard_size(total_added)) if spread_new_images else size
        first, generation = stored.next_shard_id, stored.generation + 1
    new_shards = -(-total_added // new_size) if total_added else 0
    offsets: dict[int, int] = {}
    offset = 0
    for part in parts:
        offsets[part.number] = offset
        offset += added.get(part.number, 0)
        for shard_id in _new_shards_of(offsets[part.number], added.get(part.number, 0), new_size, first):
            holders.setdefault(shard_id, set()).add(part.number)
    holding = set().union(*holders.values()) if holders else set()
    written = [part for part in parts if part.number in holding]
    numbering = [_Numbering(first, new_size, generation, offsets[part.number], labels.get(part.label, -1))
                 for part in written]
    digests = distributor.map(partial(_write_part, context=context),
                              [(tasks[part.number], numbers) for part, numbers in zip(written, numbering)])
    shards = {shard_id: PlannedShard(count, stored.shards[shard_id].generation, tuple(sorted(holders[shard_id])))
              for shard_id, count in kept.items() if count} if stored is not None else {}
    for index in range(new_shards):
        shard_id = first + index
        shards[shard_id] = PlannedShard(min(new_size, total_added - index * new_size), generation,
                                        tuple(sorted(holders[shard_id])))
    shrunk = sum(1 for shard_id, count in kept.items() if count and count < stored.shards[shard_id].images) \
        if stored is not None else 0
    generations = [*(stored.generations if stored is not None else []),
                   _generation(generation, total_added, removed, new_shards, shrunk)]
    plan = ShardPlan(rows=context.rows, shards=dict(sorted(shards.items())),
                     parts=[PlanPart(part.number, part.path, part.label, tasks[part.number].quota) for part in written],
                     labels=labels, shard_size=size, generations=generations, next_shard_id=first + new_shards,
                     digest=hashlib.sha256("".join(digests).encode()).hexdigest())
    folder.write_plan(plan)
    return plan


def _new_shards_of(offset: int, added: int, size: int, first: int) -> range:
    """The new shards a part's `added` images fall in, from its `offset` among all new images."""
    return range(first + offset // size, first + (offset + added - 1) // size + 1) if added else range(0)


def _generation(generation: int, added: int, removed: int, shards_added: int, shards_shrunk: int) -> dict[str, Any]:
    """One line of the run's history, as plan.json and the manifest list it."""
    return {"generation": generation, "created_unix": time.time(), "images_added": added,
            "images_removed": removed, "shards_added": shards_added, "shards_shrunk": shards_shrunk}


def _counts_as_failed(unlisted: UnlistedFile, selection: Selection) -> bool:
    """A file that cannot be an image counts as a failed image when no cap applies and its class is selected (one
    in no class folder: when no class is chosen)."""
    if selection.limit is not None or selection.per_class is not None:
        return False
    return not selection.classes or class_selected(unlisted.label, selection)


# -- the tasks ---------------------------------------------------------------------------------------------------


def _list_part(part: SourcePart, context: _Context) -> _PartCount:
    listed = list_part(context.layout, part)
    if listed.images:
        table = pa.Table.from_pylist([_listing_row(image) for image in listed.images], schema=_LISTING_SCHEMA)
        RunFolder(context.output).write_plan_part(context.listing, part.number, table)
    return _PartCount(part.number, len(listed.images), listed.other_files, listed.hidden_files)


def _listing_row(image: ImageRecord) -> dict[str, Any]:
    return {"image_id": image.image_id, "path": image.path, "label": image.label, "split": image.split,
            "bytes": image.bytes, "version": image.version}


def _compared(task: _PartTask, context: _Context) -> tuple[list[dict], list[dict]]:
    """The part's stored rows that stay (same path, size and version, still among its first `quota` images by path)
    and its new images: in path order, as dicts."""
    folder = RunFolder(context.output)
    taken = folder.plan_part(context.listing, task.part.number).slice(0, task.quota).to_pylist() if task.quota else []
    stored = (folder.plan_part(context.stored_rows, task.stored_number).to_pylist()
              if task.stored_number is not None and context.stored_rows else [])
    wanted = {(row["image_id"], row["bytes"], row["version"]) for row in taken}
    kept = [row for row in stored if (row["image_id"], row["bytes"], row["version"]) in wanted]
    kept_ids = {row["image_id"] for row in kept}
    return kept, [row for row in taken if row["image_id"] not in kept_ids]


def _diff_part(task: _PartTask, context: _Context) -> _PartDiff:
    kept, added = _compared(task, context)
    per_shard: dict[int, int] = {}
    for row in kept:
        per_shard[row["shard_id"]] = per_shard.get(row["shard_id"], 0) + 1
    return _PartDiff(task.part.number, per_shard, len(added))


def _write_part(item: tuple[_PartTask, _Numbering], context: _Context) -> str:
    """Write the part's plan rows, by shard and then path (a row group per shard); return their digest (paths,
    sizes, versions and shards, in that order)."""
    task, numbering = item
    kept, added = _compared(task, context)
    rows = list(kept)
    for rank, row in enumerate(added):
        shard = numbering.first_shard_id + (numbering.offset + rank) // numbering.shard_size
        rows.append({**row, "label_index": numbering.label_index, "shard_id": shard,
                     "generation": numbering.generation})
    rows.sort(key=lambda row: (row["shard_id"], row["path"]))
    RunFolder(context.output).write_plan_part(context.rows, task.part.number,
                                              pa.Table.from_pylist(rows, schema=PLAN_ROWS_SCHEMA), by_shard=True)
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row['path']}\0{row['bytes']}\0{row['version']}\0{row['shard_id']}\n".encode())
    return digest.hexdigest()
