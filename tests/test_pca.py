"""The Gram-matrix PCA equals scikit-learn's PCA, and its statistics add up across shards."""

import numpy as np
import pytest
from sklearn.decomposition import PCA

from fruitpipe.errors import FruitpipeError
from fruitpipe.pca import GramStatistics, PcaModel, fit, variance_rows


def _features(rows: int = 600, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(rows, 8)) * np.linspace(4, 0.5, 8)
    mixing = rng.normal(size=(8, dim))
    return (np.abs(latent @ mixing + 0.1 * rng.normal(size=(rows, dim))) + 3.0).astype(np.float32)


def _fit_in_chunks(features: np.ndarray, k: int | None = None, variance: float | None = None,
                   chunks: int = 5) -> PcaModel:
    statistics = GramStatistics.empty(features[:50].mean(axis=0).astype(np.float64))
    for part in np.array_split(features, chunks):
        partial = GramStatistics.empty(statistics.shift)
        partial.update(part)
        statistics.merge(partial)
    return fit(statistics, k=k, variance=variance)


def test_equals_scikit_learn_pca_up_to_sign():
    features = _features()
    ours = _fit_in_chunks(features, k=10)
    reference = PCA(n_components=10, svd_solver="full").fit(features.astype(np.float64))
    np.testing.assert_allclose(ours.explained_variance_ratio, reference.explained_variance_ratio_, atol=1e-6)
    np.testing.assert_allclose(ours.explained_variance, reference.explained_variance_, rtol=1e-6)
    projected = ours.transform(features)
    expected = reference.transform(features.astype(np.float64))
    signs = np.sign(np.sum(projected * expected, axis=0))
    np.testing.assert_allclose(projected * signs, expected, atol=1e-4)


def test_k_from_variance_is_the_fewest_components_reaching_it():
    features = _features()
    model = _fit_in_chunks(features, variance=0.9)
    cumulative = np.cumsum(_fit_in_chunks(features, k=40).explained_variance_ratio)
    assert model.k == int(np.argmax(cumulative >= 0.9)) + 1
    assert model.variance_kept >= 0.9


def test_saved_model_round_trips_and_variance_rows_accumulate():
    model = _fit_in_chunks(_features(), k=5)
    loaded = PcaModel.from_npz_bytes(model.to_npz_bytes())
    np.testing.assert_array_equal(loaded.components, model.components)
    rows = variance_rows(model)
    assert [r["component"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["cumulative"] == pytest.approx(model.variance_kept)


def test_too_many_components_is_a_clear_error():
    with pytest.raises(FruitpipeError, match="pca-k 70"):
        _fit_in_chunks(_features(dim=64), k=70)
