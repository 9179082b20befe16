"""Runs that grow: the same command after photos were added to or removed from the source processes only the new
images, keeps every existing shard untouched, refits the PCA from the shards' stored statistics, and ends with the
outputs a run from scratch over the changed source would write."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fruitpipe.config import MIN_AUTO_SHARDS, build_config
from fruitpipe.errors import FruitpipeError
from fruitpipe.pca import GramStatistics, fit
from fruitpipe.pipeline import run
from fruitpipe.run_folder import RunFolder, load_run
from tests.support.compare import assert_pca_equal, vectors
from tests.support.processes import cli, snapshot, wait_until

SMALL = {"image_size": 96, "pca_k": 3, "quiet": True}


def _config(source: Path, output: Path, cache_dir: str, **changes):
    return build_config({}, {"source": str(source), "output": str(output), "cache_dir": cache_dir, "engine": "local",
                             **SMALL, **changes})


def _held_out(source: Path, index: int) -> list[Path]:
    """The `index`-th training image (path order) of every class."""
    return [sorted(folder.glob("*.jpg"))[index] for folder in sorted((source / "Training").iterdir())]


@pytest.fixture(scope="module")
def fresh(demo_root, cache_dir, tmp_path_factory):
    """A run from scratch over the whole demo Training split (72 images)."""
    return run(_config(demo_root, tmp_path_factory.mktemp("grow") / "fresh", cache_dir))


@pytest.fixture(scope="module")
def grown(demo_root, cache_dir, tmp_path_factory):
    """A run over the demo source less one image per class (66), then the same command after they came back."""
    source = tmp_path_factory.mktemp("grow-source") / "fruits"
    shutil.copytree(demo_root, source)
    parked = tmp_path_factory.mktemp("parked")
    held = _held_out(source, 5)
    for image in held:
        image.rename(parked / f"{image.parent.name}-{image.name}")
    out = tmp_path_factory.mktemp("grow") / "out"
    first = run(_config(source, out, cache_dir))
    stats_before = {p.name: p.read_bytes() for p in (out / "_shards").iterdir()}
    parts_before = snapshot(out / "features")
    for image in held:
        (parked / f"{image.parent.name}-{image.name}").rename(image)
    second = run(_config(source, out, cache_dir))
    return source, out, first, second, stats_before, parts_before


def test_growing_processes_only_the_new_images_and_equals_a_run_from_scratch(grown, fresh):
    source, out, first, second, stats_before, parts_before = grown
    assert (first.images_ok, second.images_ok) == (66, 72)
    assert second.shards_resumed == first.shards_total
    after = {p.name: p.read_bytes() for p in (out / "_shards").iterdir()}
    assert {name: after[name] for name in stats_before} == stats_before, "an existing shard was rewritten"
    assert {name: value for name, value in snapshot(out / "features").items() if name in parts_before} == parts_before
    new_stats = [json.loads(after[name]) for name in sorted(set(after) - set(stats_before))]
    # auto's shard size: the 6 new images spread over shards as a fresh run of 6 images would (one each)
    assert [s["shard_id"] for s in new_stats] == list(range(first.shards_total, second.shards_total))
    assert sum(s["images"] for s in new_stats) == 6 and len(new_stats) == min(6, MIN_AUTO_SHARDS)

    ours, theirs = second.features(), fresh.features()
    assert sorted(ours["image_id"]) == sorted(theirs["image_id"])
    ours, theirs = ours.set_index("image_id").sort_index(), theirs.set_index("image_id").sort_index()
    np.testing.assert_allclose(vectors(ours, "features"), vectors(theirs, "features"), atol=1e-5)
    assert (ours[["path", "label", "label_index", "split"]] == theirs[["path", "label", "label_index", "split"]]).all().all()
    assert_pca_equal(second.pca(), fresh.pca(), atol=1e-4)
    grown_pca, fresh_pca = RunFolder.finished(str(out)).pca_model(), RunFolder.finished(fresh.output).pca_model()
    np.testing.assert_allclose(grown_pca.explained_variance, fresh_pca.explained_variance, rtol=1e-6)
    np.testing.assert_allclose(np.abs(grown_pca.components @ fresh_pca.components.T), np.eye(3), atol=1e-6)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images_listed"] == manifest["images_ok"] == 72
    assert [(g["generation"], g["images_added"], g["images_removed"], g["shards_added"])
            for g in manifest["generations"]] == [(0, 66, 0, first.shards_total), (1, 6, 0, len(new_stats))]


def test_removed_photos_leave_the_outputs_and_the_refit_equals_a_fit_on_what_remains(grown, cache_dir, tmp_path):
    source, out, _, second, _, _ = grown
    removed = _held_out(source, 0)[:3] + _held_out(source, 1)[:1]
    plan = pd.read_parquet(next((out / "_plan").glob("rows-*"))).set_index("path")["shard_id"]
    shrunk = {plan[image.relative_to(source).as_posix()] for image in removed}
    for image in removed:
        image.unlink()
    third = run(_config(source, out, cache_dir))
    features = third.features()
    gone = {image.relative_to(source).as_posix() for image in removed}
    assert third.images_ok == 68 and not gone & set(features["path"]) and not gone & set(third.metadata()["path"])
    assert third.shards_total == second.shards_total and third.shards_resumed == third.shards_total

    before = second.features().set_index("image_id").loc[features["image_id"]]
    np.testing.assert_array_equal(vectors(features, "features"), vectors(before, "features"))
    refit = fit(GramStatistics.of(vectors(features, "features").astype(np.float64)), k=3)
    stored = RunFolder.finished(str(out)).pca_model()
    np.testing.assert_allclose(stored.explained_variance, refit.explained_variance, rtol=1e-6)
    np.testing.assert_allclose(np.abs(stored.components @ refit.components.T), np.eye(3), atol=1e-6)
    assert len(third.pca()) == 68
    generations = json.loads((out / "manifest.json").read_text())["generations"]
    assert (generations[-1]["images_added"], generations[-1]["images_removed"], generations[-1]["shards_shrunk"]) \
        == (0, 4, len(shrunk))


def test_a_new_class_takes_the_next_label_index_and_a_capped_selection_follows_the_grown_source(demo_root, cache_dir,
                                                                                                  tmp_path):
    """--per-class keeps the first N paths of a class: a new file sorting first pushes the last one out."""
    source = tmp_path / "fruits"
    (source / "Training").mkdir(parents=True)
    classes = sorted((demo_root / "Training").iterdir())
    for folder in classes[1:3]:
        shutil.copytree(folder, source / "Training" / folder.name)
    out = tmp_path / "out"
    first = run(_config(source, out, cache_dir, per_class=3))
    shutil.copytree(classes[0], source / "Training" / classes[0].name)
    kept = sorted(path for path in first.features()["path"] if path.startswith(f"Training/{classes[1].name}/"))
    shutil.copy(source / kept[0], source / "Training" / classes[1].name / "0-added.jpg")
    grown = run(_config(source, out, cache_dir, per_class=3))
    features = grown.features()
    assert dict(zip(features["label"], features["label_index"])) == {classes[1].name: 0, classes[2].name: 1,
                                                                     classes[0].name: 2}
    assert sorted(path for path in features["path"] if path.startswith(f"Training/{classes[1].name}/")) == \
        [f"Training/{classes[1].name}/0-added.jpg", *kept[:2]]
    assert grown.images_ok == 9


def test_a_changed_runtime_still_refuses_after_photos_were_added(grown, cache_dir, tmp_path):
    source, out, *_ = grown
    used = RunFolder.finished(str(out)).model_info()["runtime"]["runtime"]
    other = "onnxruntime" if used == "openvino" else "openvino"
    extra = sorted((source / "Training" / "Banana").glob("*.jpg"))[0]
    shutil.copy(extra, extra.with_name("added-later.jpg"))
    before = snapshot(out)
    try:
        with pytest.raises(FruitpipeError, match="holds a run with another configuration"):
            run(_config(source, out, cache_dir, runtime=other))
    finally:
        extra.with_name("added-later.jpg").unlink()
    assert snapshot(out) == before


def test_a_folder_without_a_stored_plan_resumes_and_is_planned_afresh_when_it_changed(demo_root, cache_dir,
                                                                                        tmp_path):
    """A folder made before plans were stored (or with an older plan format) is planned afresh: a resume keeps every
    shard whose images are unchanged, and after a photo was added the shards that changed are redone and the ones
    beyond the new plan deleted, so the run holds exactly the grown source."""
    source = tmp_path / "fruits"
    shutil.copytree(demo_root / "Training" / "Banana", source / "Training" / "Banana")
    out = tmp_path / "out"
    first = run(_config(source, out, cache_dir, pca_k=2, shard_size=4))
    shutil.rmtree(out / "_plan")
    shutil.rmtree(out / "_gram")
    again = run(_config(source, out, cache_dir, pca_k=2, shard_size=4))
    assert again.shards_resumed == again.shards_total == first.shards_total
    assert (out / "_plan" / "plan.json").exists()
    (out / "_plan" / "plan.json").write_text(json.dumps({"shard_size": 4, "labels": {"Banana": 0}}))  # older format
    last = sorted((source / "Training" / "Banana").glob("*.jpg"))[-1]
    last.unlink()
    grown = run(_config(source, out, cache_dir, pca_k=2, shard_size=4))
    assert grown.images_ok == first.images_ok - 1 and grown.shards_total == -(-grown.images_ok // 4)
    assert grown.shards_resumed == grown.shards_total  # the last shard lost its last image: rewritten, not redone
    assert len(list((out / "_shards").glob("*.json"))) == grown.shards_total
    assert sorted(load_run(str(out)).metadata()["path"]) == sorted(
        f"Training/Banana/{image.name}" for image in (source / "Training" / "Banana").glob("*.jpg"))


@pytest.mark.s3
@pytest.mark.slow
def test_a_run_folder_on_s3_grows(moto, demo_root, cache_dir, tmp_path):
    from tests.support.s3 import create_bucket, fruitpipe_command, object_keys, read_object, s3_environment

    client = create_bucket(moto, "fruitpipe-grow")
    source = tmp_path / "fruits"
    for folder in sorted((demo_root / "Training").iterdir())[:2]:
        shutil.copytree(folder, source / "Training" / folder.name)
    held = _held_out(source, 3)
    for image in held:
        image.rename(tmp_path / f"{image.parent.name}-{image.name}")
    env = s3_environment(moto, FRUITPIPE_ENGINE="local")
    command = ["run", str(source), "s3://fruitpipe-grow/run", "--cache-dir", cache_dir, "--image-size", "96",
               "--pca-k", "3", "--shard-size", "8", "--quiet"]
    first = fruitpipe_command(command, env, timeout_s=300)
    assert first.returncode == 0, first.stderr[-3000:]
    old_stats = {key: read_object(client, "fruitpipe-grow", key) for key in object_keys(client, "fruitpipe-grow",
                                                                                         "run/_shards")}
    for image in held:
        (tmp_path / f"{image.parent.name}-{image.name}").rename(image)
    second = fruitpipe_command(command, env, timeout_s=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert {key: read_object(client, "fruitpipe-grow", key) for key in old_stats} == old_stats
    manifest = json.loads(read_object(client, "fruitpipe-grow", "run/manifest.json"))
    assert manifest["images_ok"] == 24 and manifest["shards_resumed"] == len(old_stats) == manifest["shards"] - 1
    assert [g["images_added"] for g in manifest["generations"]] == [22, 2]
    grams = object_keys(client, "fruitpipe-grow", "run/_gram")
    assert [key.rsplit("/", 1)[1][:16] for key in sorted(grams)] == ["generation-00000", "generation-00001"]


@pytest.mark.slow
def test_growth_killed_mid_run_resumes_to_the_run_from_scratch(demo_root, cache_dir, tmp_path, fresh):
    source = tmp_path / "fruits"
    shutil.copytree(demo_root, source)
    later = sorted((source / "Training").iterdir())[-2:]
    for folder in later:
        folder.rename(tmp_path / folder.name)
    out = tmp_path / "out"
    options = {"shard_size": 2}
    first = run(_config(source, out, cache_dir, **options))
    for folder in later:
        (tmp_path / folder.name).rename(folder)
    process = subprocess.Popen(cli("run", str(source), str(out), "--cache-dir", cache_dir, "--image-size", "96",
                                   "--pca-k", "3", "--shard-size", "2", "--quiet"),
                               env={**os.environ, "FRUITPIPE_ENGINE": "local"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    new_stats = out / "_shards" / f"part-{first.shards_total:05d}.json"
    try:
        wait_until(lambda: new_stats.exists() or process.poll() is not None, 120, "a new shard to finish")
        assert process.poll() is None, process.communicate()[1][-3000:]
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert not (out / "manifest.json").exists()
    resumed = run(_config(source, out, cache_dir, **options))
    assert first.shards_total < resumed.shards_resumed < resumed.shards_total
    ours, theirs = resumed.features().set_index("image_id").sort_index(), fresh.features().set_index("image_id").sort_index()
    assert list(ours.index) == list(theirs.index) and (ours["label_index"] == theirs["label_index"]).all()
    np.testing.assert_allclose(vectors(ours, "features"), vectors(theirs, "features"), atol=1e-5)
    assert_pca_equal(resumed.pca(), fresh.pca(), atol=1e-4)
    generations = json.loads((out / "manifest.json").read_text())["generations"]
    assert [g["images_added"] for g in generations] == [48, 24]
