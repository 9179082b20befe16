"""The demo dataset stands in for Fruits-360 in every test and demo, so its layout, bytes and class structure matter."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fruitpipe.demo_data import FRUITS_360_CLASSES, MARKER, DemoDatasetSummary, generate_demo_dataset
from fruitpipe.errors import FruitpipeError

NAME = re.compile(r"(?:r2?_)?\d+_100\.jpg")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoDatasetSummary]:
    root = tmp_path_factory.mktemp("demo")
    return root, generate_demo_dataset(str(root), classes=20, per_class=12, seed=0, workers=2)


def test_class_list_is_the_real_one() -> None:
    assert len(FRUITS_360_CLASSES) == 131
    assert list(FRUITS_360_CLASSES) == sorted(FRUITS_360_CLASSES)
    for name in ("Apple Braeburn", "Apple Red 1", "Banana", "Cherry Wax Red", "Pepper Green", "Walnut"):
        assert name in FRUITS_360_CLASSES


def test_layout_and_counts(demo: tuple[Path, DemoDatasetSummary]) -> None:
    root, summary = demo
    assert summary.root == str(root)
    assert len(summary.classes) == 20 and summary.classes == sorted(summary.classes)
    assert (summary.training_images, summary.test_images) == (20 * 12, 20 * 4)
    assert sorted(p.name for p in root.iterdir()) == sorted(["Training", "Test", MARKER])
    for split, count in (("Training", 12), ("Test", 4)):
        assert sorted(p.name for p in (root / split).iterdir()) == summary.classes
        for name in summary.classes:
            assert len(list((root / split / name).iterdir())) == count


def test_classes_include_spaces_and_an_apples_preset(demo: tuple[Path, DemoDatasetSummary]) -> None:
    _, summary = demo
    assert {"Apple Braeburn", "Apple Red 1"} <= set(summary.classes)
    assert sum(name.startswith("Apple") for name in summary.classes) >= 4


def test_file_names_follow_the_real_set(demo: tuple[Path, DemoDatasetSummary]) -> None:
    root, _ = demo
    names = [p.name for p in root.rglob("*") if p.is_file() and p.name != MARKER]
    assert names and all(NAME.fullmatch(name) for name in names)
    assert any(name.startswith("r_") for name in names) and any(name[0].isdigit() for name in names)


def test_images_are_100px_rgb_jpegs_on_white(demo: tuple[Path, DemoDatasetSummary]) -> None:
    root, _ = demo
    for path in list(root.rglob("*.jpg"))[::7]:
        image = Image.open(io.BytesIO(path.read_bytes()))
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (100, 100))
        pixels = np.asarray(image).astype(int)
        ring = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3),
                               pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)])
        assert (ring.min(axis=1) > 230).mean() > 0.9, path
        assert (pixels.min(axis=2) < 200).mean() > 0.1, f"{path} shows no fruit"


def test_same_seed_same_bytes_whatever_the_workers_or_class_count(tmp_path: Path,
                                                                  demo: tuple[Path, DemoDatasetSummary]) -> None:
    root, _ = demo
    generate_demo_dataset(str(tmp_path / "a"), classes=20, per_class=12, seed=0, workers=1)
    assert _files(tmp_path / "a") == _files(root)
    generate_demo_dataset(str(tmp_path / "b"), classes=3, per_class=12, seed=0, workers=2)
    subset = _files(tmp_path / "b")
    assert len(subset) == 3 * 16 and all(_files(root)[key] == data for key, data in subset.items())


def test_another_seed_gives_other_images(tmp_path: Path, demo: tuple[Path, DemoDatasetSummary]) -> None:
    root, _ = demo
    generate_demo_dataset(str(tmp_path), classes=20, per_class=12, seed=1, workers=2)
    ours, theirs = _files(tmp_path), _files(root)
    assert ours.keys() == theirs.keys()
    assert sum(ours[key] != theirs[key] for key in ours) == len(ours)


def _statistics(path: Path) -> np.ndarray:
    """Rotation-tolerant features: size and colour distribution of the non-white pixels."""
    pixels = np.asarray(Image.open(path), dtype=np.float32) / 255.0
    fruit = pixels[pixels.min(axis=2) < 0.9]
    histogram = np.histogramdd(fruit, bins=(4, 4, 4), range=[(0, 1)] * 3)[0].ravel() / len(fruit)
    return np.concatenate([[len(fruit) / 10_000], fruit.mean(axis=0), fruit.std(axis=0), histogram])


def test_classes_differ_more_between_than_within(demo: tuple[Path, DemoDatasetSummary]) -> None:
    root, summary = demo
    features = {
        split: {name: np.stack([_statistics(p) for p in (root / split / name).iterdir()]) for name in summary.classes}
        for split in ("Training", "Test")
    }
    centroids = np.stack([features["Training"][name].mean(axis=0) for name in summary.classes])
    hits = total = 0
    for label, name in enumerate(summary.classes):
        distances = ((features["Test"][name][:, None, :] - centroids[None]) ** 2).sum(axis=2)
        hits += int((distances.argmin(axis=1) == label).sum())
        total += len(distances)
    assert hits / total >= 0.85


def test_rerun_keeps_identical_files_and_drops_stale_ones(tmp_path: Path) -> None:
    generate_demo_dataset(str(tmp_path), classes=3, per_class=6, workers=1)
    kept = tmp_path / "Training" / "Apple Braeburn" / "0_100.jpg"
    stamp = kept.stat().st_mtime_ns
    interrupted = tmp_path / "Training" / "Apple Braeburn" / ".1_100.jpg.999.tmp"
    interrupted.write_bytes(b"half an image")
    summary = generate_demo_dataset(str(tmp_path), classes=2, per_class=4, workers=1)
    assert kept.stat().st_mtime_ns == stamp
    assert not interrupted.exists()
    assert sorted(p.name for p in (tmp_path / "Training").iterdir()) == summary.classes
    assert len(_files(tmp_path)) == 2 * (4 + 1)


def test_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "Training" / "Banana").mkdir(parents=True)
    (tmp_path / "Training" / "Banana" / "0_100.jpg").write_bytes(b"a real photo")
    with pytest.raises(FruitpipeError, match="not empty"):
        generate_demo_dataset(str(tmp_path), classes=1, per_class=1)
    assert (tmp_path / "Training" / "Banana" / "0_100.jpg").read_bytes() == b"a real photo"
    with pytest.raises(FruitpipeError, match="not a folder"):
        generate_demo_dataset(str(tmp_path / "Training" / "Banana" / "0_100.jpg"), classes=1, per_class=1)


@pytest.mark.parametrize(
    "arguments",
    [
        {"classes": 0},
        {"classes": 132},
        {"classes": "20"},
        {"per_class": 0},
        {"per_class": 2.5},
        {"seed": -1},
        {"test_per_class": 0},
        {"workers": 0},
        {"classes": True},
    ],
)
def test_bad_arguments_are_one_clear_sentence(tmp_path: Path, arguments: dict[str, object]) -> None:
    with pytest.raises(FruitpipeError) as error:
        generate_demo_dataset(str(tmp_path / "out"), **arguments)
    message = str(error.value)
    assert message.endswith(".") and "\n" not in message and next(iter(arguments)) in message
    assert not os.path.exists(tmp_path / "out")
