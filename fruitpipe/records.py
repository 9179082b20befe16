"""The typed records that cross the Spark boundary: the image rows a shard task reads, the stats it gives back;
and what the driver keeps of the run's shard plan, which the run folder stores so a later run can resume or grow it.

Both are plain dataclasses, picklable and small; `ShardStats` is also the shard's commit record on disk
(`RunFolder.write_shard`), so its `to_dict` is the JSON document older run folders hold and `from_dict` reads
them back (a missing `retryable` is 0: stats written before retries were counted).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageRow:
    """One planned image: who it is (the key columns of every table), where it is, and which shard does it."""

    image_id: str
    path: str
    label: str
    label_index: int
    split: str
    bytes: int
    shard_id: int
    version: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ImageRow:
        """A row from a mapping holding at least the fields (extra keys ignored; numpy scalars made plain)."""
        return cls(image_id=str(row["image_id"]), path=str(row["path"]), label=str(row["label"]),
                   label_index=int(row["label_index"]), split=str(row["split"]), bytes=int(row["bytes"]),
                   shard_id=int(row["shard_id"]), version=str(row["version"]))


@dataclass(frozen=True)
class ShardStats:
    """What one shard task did; written last, after the shard's parts, it says the shard is done."""

    shard_id: int
    images: int
    ok: int
    failed: int
    feature_dim: int
    images_sha256: str
    # Images whose loads timed out on every attempt: the shard is not done until a later run loads them.
    retryable: int = 0
    task_attempt: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=dict)
    finished_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> ShardStats:
        """Stats read back from JSON; a missing required key raises KeyError (a torn or foreign file)."""
        return cls(shard_id=int(document["shard_id"]), images=int(document["images"]), ok=int(document["ok"]),
                   failed=int(document["failed"]), feature_dim=int(document.get("feature_dim", 0)),
                   images_sha256=str(document.get("images_sha256", "")),
                   retryable=int(document.get("retryable", 0)), task_attempt=int(document.get("task_attempt", 0)),
                   seconds=dict(document.get("seconds", {})), runtime=dict(document.get("runtime", {})),
                   executor=dict(document.get("executor", {})), finished_at=float(document.get("finished_at", 0.0)))


def records_digest(rows: Iterable[ImageRow]) -> str:
    """sha256 over the images' paths, sizes and versions (mtime or ETag), in order: equal only for the same images,
    unchanged, in the same order, so a file rewritten in place with the same size is not taken for done."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row.path}\0{row.bytes}\0{row.version}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PlannedShard:
    """What the driver keeps of a planned shard: how many images, planned in which generation, and which plan
    parts hold its rows (a shard's images are contiguous in path order, so they come from one part or a few)."""

    images: int
    generation: int
    parts: tuple[int, ...]


@dataclass(frozen=True)
class PlanPart:
    """One part of a stored plan: the images of one source folder (a class), in path order, each with its shard."""

    number: int
    path: str
    label: str
    images: int


@dataclass
class ShardPlan:
    """Which image goes in which shard, as the run folder stores it (`RunFolder.write_plan`): the images in Parquet
    parts (one per class folder, written by tasks, in `rows`), and on the driver only per-shard and per-part counts.

    A run that grows keeps every existing shard and appends new ones: `PlannedShard.generation` says in which run
    a shard was planned, `labels` keeps each class's label_index for good (a new class gets the next free index),
    and `generations` records each growth (when, images and shards added and removed). `next_shard_id` is never
    reused, so a shard id always names the same images.
    """

    rows: str
    parts: list[PlanPart]
    shards: dict[int, PlannedShard]
    labels: dict[str, int]
    shard_size: int
    generations: list[dict[str, Any]]
    next_shard_id: int
    digest: str

    @property
    def generation(self) -> int:
        return int(self.generations[-1]["generation"]) if self.generations else 0

    @property
    def images(self) -> int:
        return sum(shard.images for shard in self.shards.values())

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "rows": self.rows, "shard_size": self.shard_size, "labels": self.labels,
                "next_shard_id": self.next_shard_id, "generations": self.generations, "digest": self.digest,
                "parts": [dataclasses.asdict(part) for part in self.parts],
                "shards": {str(shard_id): [shard.images, shard.generation, list(shard.parts)]
                           for shard_id, shard in sorted(self.shards.items())}}

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> ShardPlan:
        return cls(rows=str(document["rows"]), parts=[PlanPart(**part) for part in document["parts"]],
                   shards={int(shard_id): PlannedShard(int(images), int(generation), tuple(parts))
                           for shard_id, (images, generation, parts) in document["shards"].items()},
                   labels={str(k): int(v) for k, v in document["labels"].items()},
                   shard_size=int(document["shard_size"]), generations=list(document["generations"]),
                   next_shard_id=int(document["next_shard_id"]), digest=str(document["digest"]))


# The stored plan's format; a plan.json without it (or older) is not read back: that folder is planned afresh and
# its shards are kept where their images are unchanged (see fruitpipe.planning).
PLAN_VERSION = 2
