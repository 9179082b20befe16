"""The spine end to end on the demo data: outputs, their agreement, PCA correctness, transform, resume."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.decomposition import PCA

from fruitpipe.config import build_config
from fruitpipe.pipeline import run, transform
from fruitpipe.run_folder import RunFolder
from tests.support.compare import vectors as _vectors

pytestmark = pytest.mark.spark

PARQUET_OUTPUTS = ("features", "pca", "metadata", "errors")


def test_row_counts_agree_across_outputs_and_manifest(finished_run):
    out = Path(finished_run.output)
    manifest = json.loads((out / "manifest.json").read_text())
    features, pca, metadata = finished_run.features(), finished_run.pca(), finished_run.metadata()
    assert len(features) == len(pca) == manifest["outputs"]["features"]["rows"] == manifest["images_ok"]
    assert len(metadata) == manifest["images_listed"] == manifest["images_ok"] + manifest["images_failed"]
    assert set(features["image_id"]) == set(pca["image_id"])
    assert _vectors(features, "features").shape[1] == 1280
    assert _vectors(pca, "pca").shape[1] == 10
    assert manifest["outputs"]["errors"]["rows"] == manifest["images_failed"] == 0


def test_every_parquet_output_reads_in_pandas_and_duckdb(finished_run):
    out = Path(finished_run.output)
    for name in PARQUET_OUTPUTS:
        frame = pd.read_parquet(out / name)
        count = duckdb.sql(f"select count(*) from read_parquet('{out / name}/*.parquet')").fetchall()[0][0]
        assert count == len(frame)
    dims = duckdb.sql(f"select distinct len(features) from read_parquet('{out}/features/*.parquet')").fetchall()
    assert dims == [(1280,)]
    assert (out / "errors").is_dir()


def test_documents_describe_the_run(finished_run):
    out = Path(finished_run.output)
    info = json.loads((out / "model_info" / "model_info.json").read_text())
    assert info["model"] == "efficientnet_lite0" and info["image_size"] == 224 and info["pca_k"] == 10
    assert len(info["weights_sha256"]) == 64
    assert info["counts"]["images_ok"] == finished_run.images_ok
    assert {"extract", "pca_fit", "pca_transform", "total"} <= set(info["seconds"])
    variance = pd.read_csv(out / "variance.csv")
    assert list(variance.columns) == ["component", "ratio", "cumulative"]
    assert variance["cumulative"].iloc[-1] == pytest.approx(finished_run.variance_kept)
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["pca_k"] == 10 and config["model"] == "efficientnet_lite0"
    pca_csv = pd.read_csv(out / "csv" / "pca.csv")
    assert [c for c in pca_csv.columns if c.startswith("pc")] == [f"pc{i}" for i in range(1, 11)]
    assert len(pd.read_csv(out / "csv" / "features.csv").columns) == 5 + 1280
    assert len(pd.read_csv(out / "csv" / "metadata.csv")) == finished_run.images_listed


def test_pca_equals_scikit_learn_on_the_run_features(finished_run):
    features = finished_run.features().sort_values("image_id")
    pca = finished_run.pca().set_index("image_id").loc[features["image_id"]]
    matrix = _vectors(features, "features").astype(np.float64)
    reference = PCA(n_components=10, svd_solver="full").fit(matrix)
    model = RunFolder.finished(finished_run.output).pca_model()
    np.testing.assert_allclose(model.explained_variance_ratio, reference.explained_variance_ratio_, atol=1e-6)
    ours, expected = _vectors(pca, "pca"), reference.transform(matrix)
    signs = np.sign(np.sum(ours * expected, axis=0))
    np.testing.assert_allclose(ours * signs, expected, atol=1e-4)


def test_transform_reproduces_the_run_pca_rows(finished_run, demo_root, tmp_path):
    config = build_config({}, {"source": str(demo_root), "output": str(tmp_path / "projected"), "quiet": True})
    result = transform(finished_run.output, config)
    assert result.images_ok == finished_run.images_ok
    ours = result.pca().set_index("image_id").sort_index()
    theirs = finished_run.pca().set_index("image_id").sort_index()
    np.testing.assert_allclose(_vectors(ours, "pca"), _vectors(theirs, "pca"), atol=1e-4)


def test_rerun_resumes_every_done_shard_and_changes_nothing(finished_run, demo_root, cache_dir):
    before = finished_run.pca().set_index("image_id").sort_index()
    config = build_config({}, {"source": str(demo_root), "output": finished_run.output, "pca_k": 10,
                               "shard_size": 20, "cache_dir": cache_dir, "quiet": True, "features_csv": True})
    again = run(config)
    assert again.shards_resumed == again.shards_total == finished_run.shards_total
    after = again.pca().set_index("image_id").sort_index()
    np.testing.assert_allclose(_vectors(after, "pca"), _vectors(before, "pca"), atol=1e-6)


def test_mini_mode_spreads_images_evenly_over_classes(demo_root, spark, cache_dir, tmp_path):
    config = build_config({}, {"source": str(demo_root), "output": str(tmp_path / "mini"), "mode": "mini",
                               "limit": 30, "pca_k": 5, "cache_dir": cache_dir, "quiet": True})
    result = run(config)
    counts = result.metadata()["label"].value_counts()
    assert result.images_listed == 30 and len(counts) == 6 and set(counts) == {5}


def test_default_shards_spread_a_small_run_and_the_same_command_resumes(demo_root, spark, cache_dir, tmp_path):
    """With no --shard-size, 30 images make 8 shards (so every core gets work), and a re-run resumes all 8."""
    options = {"source": str(demo_root), "output": str(tmp_path / "auto"), "limit": 30, "pca_k": 5,
               "cache_dir": cache_dir, "quiet": True}
    result = run(build_config({}, options))
    assert result.shards_total == 8 and result.images_ok == 30
    resolved = yaml.safe_load((Path(result.output) / "config.yaml").read_text())
    assert resolved["shard_size"] == 4
    assert run(build_config({}, options)).shards_resumed == 8
    assert run(build_config({}, {**options, "shard_size": 4})).shards_resumed == 8


def test_auto_shard_size_depends_on_the_image_count_alone():
    from fruitpipe.config import auto_shard_size

    assert [auto_shard_size(n) for n in (1, 7, 8, 600, 8192, 8193, 67_692)] == [1, 1, 1, 75, 1024, 1024, 1024]
