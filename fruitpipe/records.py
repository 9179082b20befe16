"""The typed records that cross the Spark boundary: the image rows a shard task gets, the stats it gives back;
and the run's shard plan, which the run folder stores so a later run can grow it.

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


@dataclass
class ShardPlan:
    """Which image goes in which shard, as the run folder stores it (`RunFolder.write_plan`).

    A run that grows keeps every existing shard and appends new ones: `generation` says in which run a shard was
    planned, `labels` keeps each class's label_index for good (a new class gets the next free index), and
    `generations` records each growth (when, images and shards added and removed). `next_shard_id` is never
    reused, so a shard id always names the same images.
    """

    shards: dict[int, list[ImageRow]]
    shard_generation: dict[int, int]
    labels: dict[str, int]
    shard_size: int
    generations: list[dict[str, Any]]
    next_shard_id: int

    @property
    def generation(self) -> int:
        return int(self.generations[-1]["generation"]) if self.generations else 0

    @property
    def images(self) -> int:
        return sum(len(rows) for rows in self.shards.values())

    def digest(self) -> str:
        """records_digest over every planned image in shard order: the run's listing identity."""
        return records_digest(row for shard_id in sorted(self.shards) for row in self.shards[shard_id])
