"""Comparing feature and PCA rows of two runs, and two listings of a source."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fruitpipe.dataset import list_split
from fruitpipe.records import ImageRow, records_digest


def listing_digest(source: str) -> str:
    """A digest of a source's Training images as a run would plan them: paths, sizes and versions, in order."""
    return records_digest(ImageRow(image.image_id, image.path, image.label, 0, image.split, image.bytes, 0,
                                   image.version) for image in list_split(source, "Training").images)


def vectors(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A list-valued column (`features`, `pca`) as one float32 matrix, a row per frame row."""
    return np.stack(frame[column].to_numpy()).astype(np.float32)


def assert_pca_equal(ours: pd.DataFrame, theirs: pd.DataFrame, atol: float) -> None:
    """Equal PCA rows by image id, each component up to its sign."""
    ours, theirs = ours.set_index("image_id").sort_index(), theirs.set_index("image_id").sort_index()
    assert list(ours.index) == list(theirs.index)
    a, b = vectors(ours, "pca"), vectors(theirs, "pca")
    signs = np.where(np.sum(a * b, axis=0) < 0, -1.0, 1.0).astype(np.float32)
    np.testing.assert_allclose(a * signs, b, atol=atol)
