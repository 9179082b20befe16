"""Resume: a rerun keeps the shards that are whole, redoes the rest, cleans killed writers' temp files, and refuses
to mix runs of another configuration or another set of images; --overwrite starts afresh."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fruitpipe.cli import main
from fruitpipe.config import build_config
from fruitpipe.pipeline import run
from tests.support.processes import snapshot as _snapshot

pytestmark = pytest.mark.spark

SETTINGS = {"image_size": 96, "pca_k": 3, "shard_size": 8, "quiet": True}


def _config(source: Path, output: Path, cache_dir: str, **changes):
    return build_config({}, {"source": str(source), "output": str(output), "cache_dir": cache_dir,
                             **SETTINGS, **changes})


@pytest.fixture(scope="module")
def base_run(demo_root, spark, cache_dir, tmp_path_factory):
    """A finished run over the demo Training split: 72 images in 9 shards."""
    return run(_config(demo_root, tmp_path_factory.mktemp("resume") / "base", cache_dir))


def _copy_run(base_run, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(base_run.output, out)
    return out


def _finished_at(out: Path) -> dict[int, float]:
    return {int(p.stem[5:]): json.loads(p.read_text())["finished_at"] for p in (out / "_shards").glob("part-*.json")}


def _sorted_vectors(frame: pd.DataFrame, column: str) -> tuple[list[str], np.ndarray]:
    frame = frame.sort_values("image_id")
    return list(frame["image_id"]), np.stack(frame[column].to_numpy()).astype(np.float64)


def _assert_same_outputs(result, base_run) -> None:
    manifest = json.loads((Path(result.output) / "manifest.json").read_text())
    assert manifest["images_listed"] == manifest["images_ok"] + manifest["images_failed"] == base_run.images_listed
    ids, features = _sorted_vectors(result.features(), "features")
    base_ids, base_features = _sorted_vectors(base_run.features(), "features")
    assert ids == base_ids and len(set(ids)) == len(ids)
    np.testing.assert_allclose(features, base_features, atol=1e-6)
    pca_ids, pca = _sorted_vectors(result.pca(), "pca")
    assert pca_ids == base_ids
    np.testing.assert_allclose(pca, _sorted_vectors(base_run.pca(), "pca")[1], atol=1e-5)
    assert len(result.metadata()) == len(set(result.metadata()["image_id"])) == base_run.images_listed


def test_rerun_redoes_exactly_the_shards_that_are_unfinished_torn_or_disagree(base_run, demo_root, cache_dir,
                                                                               tmp_path):
    out = _copy_run(base_run, tmp_path)
    before = _finished_at(out)
    (out / "_shards" / "part-00001.json").unlink()
    torn = out / "features" / "part-00002.parquet"
    torn.write_bytes(torn.read_bytes()[:-64])
    (out / "metadata" / "part-00003.parquet").unlink()
    disagreeing = out / "_shards" / "part-00004.json"
    stats = json.loads(disagreeing.read_text())
    disagreeing.write_text(json.dumps({**stats, "ok": stats["ok"] - 1, "failed": stats["failed"] + 1}))
    (out / "_shards" / "part-00005.json").write_text('{"shard_id": 5, "ok"')
    leftovers = [out / "features" / f".part-00006.parquet.{uuid.uuid4().hex}.tmp",
                 out / "_shards" / f".part-00007.json.{uuid.uuid4().hex}.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a write")

    result = run(_config(demo_root, out, cache_dir))

    redone = {1, 2, 3, 4, 5}
    assert result.shards_total == 9 and result.shards_resumed == 9 - len(redone)
    after = _finished_at(out)
    assert {i for i in before if after[i] != before[i]} == redone
    assert not any(leftover.exists() for leftover in leftovers)
    assert not list(out.rglob("*.tmp"))
    _assert_same_outputs(result, base_run)


def test_overwrite_starts_afresh(base_run, demo_root, cache_dir, tmp_path):
    out = _copy_run(base_run, tmp_path)
    stale = out / "features" / "part-00042.parquet"
    shutil.copy(out / "features" / "part-00000.parquet", stale)
    result = run(_config(demo_root, out, cache_dir, overwrite=True))
    assert result.shards_resumed == 0 and not stale.exists()
    _assert_same_outputs(result, base_run)


@pytest.mark.parametrize("flags", [
    ["--image-size", "64"],
    ["--weights", "random"],
    ["--model", "mobilenet_v2", "--weights", "random"],
    ["--classes", "Apple*"],
    ["--limit", "30"],
    ["--per-class", "5"],
    ["--split", "Test"],
    ["--shard-size", "16"],
], ids=lambda flags: " ".join(flags))
def test_a_changed_configuration_is_refused_and_nothing_is_written(base_run, demo_root, cache_dir, capsys, flags):
    out = Path(base_run.output)
    before = _snapshot(out)
    argv = ["run", str(demo_root), str(out), "--image-size", "96", "--pca-k", "3", "--shard-size", "8",
            "--cache-dir", cache_dir, "--quiet", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a run with another configuration" in err and "--overwrite" in err
    assert _snapshot(out) == before


def test_another_source_is_refused(base_run, demo_root, cache_dir, tmp_path, capsys):
    other = tmp_path / "copy-of-demo"
    shutil.copytree(demo_root, other)
    out = Path(base_run.output)
    before = _snapshot(out)
    assert main(["run", str(other), str(out), "--image-size", "96", "--pca-k", "3", "--shard-size", "8",
                 "--cache-dir", cache_dir, "--quiet"]) == 2
    assert "holds a run with another configuration" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_source_that_changed_since_the_run_grows_on_spark(base_run, demo_root, cache_dir, tmp_path):
    """An added file goes into a new shard; one rewritten in place leaves its shard (rewritten from its own parts)
    and is extracted again in the new shard; the untouched shard is kept as it was."""
    source = tmp_path / "source"
    shutil.copytree(demo_root, source)
    out = tmp_path / "out"
    first = run(_config(source, out, cache_dir, classes=["Banana"]))
    assert first.images_listed == 12 and first.shards_total == 2
    banana = sorted((source / "Training" / "Banana").glob("*.jpg"))
    shutil.copy(banana[0], banana[0].with_name("added.jpg"))
    shutil.copy(banana[-1], banana[1])
    untouched = (out / "_shards" / "part-00001.json").read_bytes()
    again = run(_config(source, out, cache_dir, classes=["Banana"]))
    assert again.images_listed == again.images_ok == 13 and (again.shards_total, again.shards_resumed) == (3, 2)
    assert (out / "_shards" / "part-00001.json").read_bytes() == untouched
    assert json.loads((out / "_shards" / "part-00002.json").read_text())["images"] == 2
    features = again.features().set_index("path")
    rewritten, original = (image.relative_to(source).as_posix() for image in (banana[1], banana[-1]))
    np.testing.assert_allclose(features.loc[rewritten, "features"], features.loc[original, "features"], atol=1e-6)
    assert [g["images_added"] for g in json.loads((out / "manifest.json").read_text())["generations"]] == [12, 2]
