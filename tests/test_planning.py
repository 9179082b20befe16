"""The shard plan made by tasks (fruitpipe.planning) equals a plan cut from the whole listing at once: the same
images, in the same order, in the same shards, for every selection; and the driver keeps counts, not images."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest

from fruitpipe.config import Selection
from fruitpipe.dataset import ImageRecord, list_split, quotas, select, selected_parts, source_layout
from fruitpipe.distributors import DriverDistributor
from fruitpipe.planning import plan_run
from fruitpipe.run_folder import RunFolder
from tests.support.images import bmp

SIZES = {"Apple": 7, "Apple Braeburn": 3, "Banana": 11, "Cherry 1": 1, "Kiwi": 0, "Lemon": 5}


def _round_robin(by_class: dict[str, int], limit: int) -> dict[str, int]:
    """The selection as fruitpipe took it before quotas: depth by depth over the sorted classes."""
    taken = dict.fromkeys(by_class, 0)
    depth = 0
    while sum(taken.values()) < limit and any(depth < count for count in by_class.values()):
        for label in sorted(by_class):
            if depth < by_class[label] and sum(taken.values()) < limit:
                taken[label] += 1
        depth += 1
    return taken


def test_quotas_take_a_limit_class_by_class_in_turn():
    draw = random.Random(0)
    for _ in range(300):
        counts = {f"c{index}": draw.choice([0, 1, 2, 5, 40]) for index in range(draw.randint(1, 12))}
        per_class = draw.choice([None, 1, 3])
        limit = draw.choice([None, 1, 7, 50, 1000])
        capped = {label: min(count, per_class) if per_class else count for label, count in counts.items()}
        expected = _round_robin(capped, limit) if limit is not None else capped
        assert quotas(counts, Selection(per_class=per_class, limit=limit)) == expected


@pytest.fixture()
def source(tmp_path):
    """Uneven classes, one of them empty; a nested folder; names that sort differently with and without '/'."""
    root = tmp_path / "src"
    for label, count in SIZES.items():
        (root / "Training" / label).mkdir(parents=True)
        for index in range(count):
            (root / "Training" / label / f"{index:02d}.bmp").write_bytes(bmp(index))
    (root / "Training" / "Banana" / "more").mkdir()
    (root / "Training" / "Banana" / "more" / "x.bmp").write_bytes(bmp(99))
    (root / "Test" / "Apple").mkdir(parents=True)
    (root / "Test" / "Apple" / "t.bmp").write_bytes(bmp(1))
    return root


def _plan(out: str, source, selection: Selection, shard_size: int | None, stored=None):
    """The run's plan over `source` as the pipeline makes it, its tasks in this process."""
    layout = source_layout(str(source), "Training")
    return plan_run(DriverDistributor(), RunFolder(out), layout, selected_parts(layout, selection), selection,
                    shard_size, stored, spread_new_images=False)


def _planned_rows(out: str, plan) -> list[tuple[str, int, int]]:
    folder = RunFolder(out)
    return [(row.path, row.shard_id, row.label_index)
            for shard_id, shard in sorted(plan.shards.items())
            for row in folder.shard_rows(plan.rows, shard_id, shard.parts)]


@pytest.mark.parametrize("selection", [Selection(), Selection(per_class=2), Selection(limit=9),
                                       Selection(classes=("Apple*", "Lemon"), limit=6),
                                       Selection(per_class=4, limit=10)], ids=str)
@pytest.mark.parametrize("shard_size", [1, 4, 64])
def test_the_plan_equals_one_cut_from_the_whole_listing(source, tmp_path, selection, shard_size):
    out = str(tmp_path / "out")
    planned = _plan(out, source, selection, shard_size)
    images: list[ImageRecord] = select(list_split(str(source), "Training").images, selection)
    labels = {label: index for index, label in enumerate(sorted({image.label for image in images}))}
    expected = [(image.path, number // shard_size, labels[image.label]) for number, image in enumerate(images)]
    assert _planned_rows(out, planned.plan) == expected
    assert planned.plan.images == len(images)
    assert {shard_id: shard.images for shard_id, shard in planned.plan.shards.items()} == {
        shard_id: sum(1 for _, shard, _ in expected if shard == shard_id) for shard_id in {s for _, s, _ in expected}}
    # What the driver stores: counts per part and per shard; the images are in the parts the tasks wrote.
    stored = RunFolder(out).stored_plan()
    assert stored is not None and stored.to_dict() == planned.plan.to_dict()
    assert sum(pq.read_metadata(part).num_rows for part in (tmp_path / "out" / "_plan" / stored.rows).iterdir()) \
        == len(images)
    assert not [name for name in (tmp_path / "out" / "_plan").iterdir() if name.name.startswith("listing-")]


def test_a_grown_plan_keeps_every_shard_and_numbers_new_images_after_them(source, tmp_path):
    out = str(tmp_path / "out")
    first = _plan(out, source, Selection(), 4).plan
    before = _planned_rows(out, first)
    (source / "Training" / "Apple" / "new.bmp").write_bytes(bmp(50))
    (source / "Training" / "Durian").mkdir()
    (source / "Training" / "Durian" / "d.bmp").write_bytes(bmp(51))
    removed = source / "Training" / "Banana" / "03.bmp"
    removed.unlink()
    grown = _plan(out, source, Selection(), 4, first).plan
    after = _planned_rows(out, grown)
    kept = [row for row in before if not row[0].endswith("Banana/03.bmp")]
    assert [row for row in after if row[1] < first.next_shard_id] == kept
    added = [row for row in after if row[1] >= first.next_shard_id]
    assert [path for path, _, _ in added] == ["Training/Apple/new.bmp", "Training/Durian/d.bmp"]
    assert {shard for _, shard, _ in added} == {first.next_shard_id}
    assert grown.labels == {**first.labels, "Durian": max(first.labels.values()) + 1}
    assert grown.generations[-1] | {"created_unix": 0} == {"generation": 1, "created_unix": 0, "images_added": 2,
                                                          "images_removed": 1, "shards_added": 1, "shards_shrunk": 1}
    unchanged = _plan(out, source, Selection(), 4, grown).plan
    assert unchanged is grown
