"""Image bytes made for a test."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def bmp(seed: int, side: int = 64) -> bytes:
    """An uncompressed BMP: every image of one side has the same byte size, whatever its pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "BMP")
    return buffer.getvalue()
