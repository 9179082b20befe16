"""Centred PCA from one pass of sufficient statistics (count, sum, Gram matrix) over feature batches.

The statistics of separate shards add up, so executors compute them where the features are and the driver
only solves a D x D eigenproblem (D = 1280: milliseconds). Results equal scikit-learn's PCA (full SVD).
Each shard's statistics are taken about its own mean and stored with the shard (`to_bytes`: count, mean and the
upper triangle of the centred Gram in float64, 6.5 MB at D = 1280), so a run that grows refits by merging them
(Chan et al.'s exact pairwise formula) without reading old features again.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from fruitpipe.errors import FruitpipeError


@dataclass
class GramStatistics:
    """Count, sum and X^T X of the rows seen, around a fixed shift that keeps float64 sums well conditioned."""

    shift: np.ndarray
    count: int
    total: np.ndarray
    gram: np.ndarray

    @classmethod
    def empty(cls, shift: np.ndarray) -> GramStatistics:
        dimension = shift.shape[0]
        return cls(shift.astype(np.float64), 0, np.zeros(dimension), np.zeros((dimension, dimension)))

    @classmethod
    def of(cls, rows: np.ndarray) -> GramStatistics:
        """The statistics of `rows` about their own mean (the best-conditioned shift there is)."""
        statistics = cls.empty(rows.astype(np.float64).mean(axis=0))
        statistics.update(rows)
        return statistics

    def to_bytes(self) -> bytes:
        """Count, mean and the upper triangle of the Gram about the mean (the matrix is symmetric), as npz."""
        mean, centred = self._about_mean()
        buffer = io.BytesIO()
        np.savez(buffer, count=np.array(self.count), mean=mean, gram_upper=centred[np.triu_indices(mean.shape[0])])
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> GramStatistics:
        with np.load(io.BytesIO(data)) as arrays:
            mean = arrays["mean"]
            gram = np.zeros((mean.shape[0], mean.shape[0]))
            gram[np.triu_indices(mean.shape[0])] = arrays["gram_upper"]
            gram = gram + np.triu(gram, 1).T
            return cls(mean, int(arrays["count"]), np.zeros(mean.shape[0]), gram)

    def update(self, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        centred = rows.astype(np.float64) - self.shift
        self.count += rows.shape[0]
        self.total += centred.sum(axis=0)
        self.gram += centred.T @ centred

    def merge(self, other: GramStatistics) -> None:
        """Add `other`'s rows. With another shift both are taken about their means and combined with the exact
        pairwise formula (Chan et al.), so no large shift difference is ever squared and subtracted."""
        if other.count == 0:
            return
        if np.array_equal(self.shift, other.shift) or self.count == 0:
            if self.count == 0:
                self.shift = other.shift.copy()
                self.total = np.zeros_like(other.total)
                self.gram = np.zeros_like(other.gram)
            self.count += other.count
            self.total += other.total
            self.gram += other.gram
            return
        (mean, centred), (other_mean, other_centred) = self._about_mean(), other._about_mean()
        count = self.count + other.count
        delta = other_mean - mean
        self.gram = centred + other_centred + np.outer(delta, delta) * (self.count * other.count / count)
        self.shift = mean + delta * (other.count / count)
        self.total = np.zeros_like(mean)
        self.count = count

    def _about_mean(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, Gram of the rows about their mean)."""
        if self.count == 0:
            return self.shift, self.gram
        centred_mean = self.total / self.count
        return self.shift + centred_mean, self.gram - self.count * np.outer(centred_mean, centred_mean)

    def covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased covariance) of every row seen."""
        if self.count < 2:
            raise FruitpipeError(f"PCA needs at least 2 images with features, got {self.count}")
        centred_mean = self.total / self.count
        covariance = (self.gram - self.count * np.outer(centred_mean, centred_mean)) / (self.count - 1)
        return centred_mean + self.shift, (covariance + covariance.T) / 2


@dataclass(frozen=True)
class PcaModel:
    """A fitted PCA: enough to project new features exactly as the run did."""

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    total_variance: float
    n_samples: int

    @property
    def k(self) -> int:
        return int(self.components.shape[0])

    @property
    def variance_kept(self) -> float:
        return float(self.explained_variance_ratio.sum())

    def transform(self, features: np.ndarray) -> np.ndarray:
        """Project [N, D] features to [N, k] float32."""
        if features.shape[0] == 0:
            return np.zeros((0, self.k), dtype=np.float32)
        if features.shape[1] != self.mean.shape[0]:
            raise FruitpipeError(f"features have {features.shape[1]} values, the PCA expects {self.mean.shape[0]}")
        return ((features.astype(np.float64) - self.mean) @ self.components.T).astype(np.float32)

    def to_npz_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, components=self.components, explained_variance=self.explained_variance,
                 explained_variance_ratio=self.explained_variance_ratio,
                 total_variance=np.array(self.total_variance), n_samples=np.array(self.n_samples))
        return buffer.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> PcaModel:
        with np.load(io.BytesIO(data)) as arrays:
            return cls(mean=arrays["mean"], components=arrays["components"],
                       explained_variance=arrays["explained_variance"],
                       explained_variance_ratio=arrays["explained_variance_ratio"],
                       total_variance=float(arrays["total_variance"]), n_samples=int(arrays["n_samples"]))

    def summary(self) -> dict:
        """The JSON side of the saved model: readable without numpy."""
        return {"k": self.k, "input_dim": int(self.mean.shape[0]), "n_samples": self.n_samples,
                "total_variance": self.total_variance, "variance_kept": self.variance_kept,
                "explained_variance_ratio": [float(v) for v in self.explained_variance_ratio],
                "explained_variance": [float(v) for v in self.explained_variance]}


def fit(statistics: GramStatistics, k: int | None = None, variance: float | None = None) -> PcaModel:
    """Eigendecompose the covariance; keep k components, or the fewest whose variance reaches `variance`."""
    mean, covariance = statistics.covariance()
    dimension = covariance.shape[0]
    max_components = min(dimension, statistics.count)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][:max_components]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    components = eigenvectors[:, order].T
    total = float(np.trace(covariance))
    ratios = eigenvalues / total if total > 0 else np.zeros_like(eigenvalues)
    if variance is not None:
        k = int(np.searchsorted(np.cumsum(ratios), variance - 1e-12) + 1)
        k = min(k, max_components)
    assert k is not None
    if k > max_components:
        raise FruitpipeError(f"--pca-k {k} is larger than possible here: at most {max_components} "
                             f"(feature dimension {dimension}, {statistics.count} images)")
    components = _deterministic_signs(components[:k])
    return PcaModel(mean=mean, components=components, explained_variance=eigenvalues[:k],
                    explained_variance_ratio=ratios[:k], total_variance=total, n_samples=statistics.count)


def _deterministic_signs(components: np.ndarray) -> np.ndarray:
    """Flip each component so its largest-magnitude loading is positive (scikit-learn's convention)."""
    largest = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), largest])
    signs[signs == 0] = 1.0
    return components * signs[:, None]


def variance_rows(model: PcaModel) -> list[dict]:
    """Rows of variance.csv: component (1-based), ratio, cumulative."""
    cumulative = np.cumsum(model.explained_variance_ratio)
    return [{"component": i + 1, "ratio": float(r), "cumulative": float(c)}
            for i, (r, c) in enumerate(zip(model.explained_variance_ratio, cumulative))]


def model_json(model: PcaModel, extra: dict) -> str:
    return json.dumps({**model.summary(), **extra}, indent=2, sort_keys=True) + "\n"
