"""Images made for a test: one image's bytes, or a demo dataset in the Fruits-360 layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def bmp(seed: int, side: int = 64) -> bytes:
    """An uncompressed BMP: every image of one side has the same byte size, whatever its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "BMP")
    return buffer.getvalue()


def demo_dataset(tmp_path_factory, name: str, *, per_class: int, seed: int, classes: int = 6) -> Path:
    """A generated demo dataset (`classes` x `per_class` training images, and test images) in a new temp folder."""
    from fruitpipe.demo_data import generate_demo_dataset

    root = tmp_path_factory.mktemp(name)
    generate_demo_dataset(str(root), classes=classes, per_class=per_class, seed=seed, workers=2)
    return root
