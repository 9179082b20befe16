"""Near-duplicates and split leakage (issue 12 part 3): re-encoded copies planted among demo images (JPEG quality
changed, chroma subsampling changed, a 1-pixel shift, a copy filed under another class, a copy in the Test split)
are all found at the default threshold and no pair of distinct demo images is; the results are read back, listed
in the manifest, and work with an S3 run folder (as does `similar` with a query in S3)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fruitpipe
from fruitpipe import duplicates
from fruitpipe.cli import main
from fruitpipe.config import build_config
from fruitpipe.errors import FruitpipeError
from fruitpipe.index import open_index
from fruitpipe.pipeline import run
from fruitpipe.run_folder import RunFolder
from tests.support.s3 import create_bucket, fruitpipe_command, object_keys, s3_environment, upload_tree

ORIGINALS = ["Banana/2_100.jpg", "Apple Red 1/r_4_100.jpg", "Cherry Wax Red/5_100.jpg"]


def _reencodings(image: Image.Image) -> dict[str, tuple[Image.Image, dict]]:
    """Name -> (image, JPEG save options) of the copies planted for one original."""
    pixels = np.asarray(image)
    shifted = Image.fromarray(np.concatenate([pixels[:, :1], pixels[:, :-1]], axis=1))  # 1 px right
    return {"q75": (image, {"quality": 75}), "q90s444": (image, {"quality": 90, "subsampling": 0}),
            "shift": (shifted, {"quality": 95, "subsampling": 0})}


@pytest.fixture(scope="module")
def planted(demo_root, tmp_path_factory, spark, cache_dir):
    """The demo dataset with re-encoded copies planted in Training (one filed under another class) and one in Test;
    a run over its Training split and the Test split extracted with that run's model and PCA."""
    root = tmp_path_factory.mktemp("planted")
    source = root / "source"
    shutil.copytree(demo_root, source)
    copies = {}
    for original in ORIGINALS:
        label = original.split("/")[0]
        image = Image.open(source / "Training" / original).convert("RGB")
        for kind, (copy, options) in _reencodings(image).items():
            path = f"Training/{label}/planted-{kind}-{original.split('/')[1]}"
            copy.save(source / path, "JPEG", **options)
            copies[path] = f"Training/{original}"
    mislabelled = "Training/Apple Golden 1/planted-mislabelled.jpg"
    Image.open(source / "Training" / ORIGINALS[0]).save(source / mislabelled, "JPEG", quality=85)
    copies[mislabelled] = f"Training/{ORIGINALS[0]}"
    leaked = "Test/Cherry Wax Red/planted-leak.jpg"
    Image.open(source / "Training" / ORIGINALS[2]).save(source / leaked, "JPEG", quality=80)
    output, test_output = root / "run", root / "test"
    settings = {"pca_k": 5, "shard_size": 40, "cache_dir": cache_dir, "quiet": True}
    run(build_config({}, {"source": str(source), "output": str(output), **settings}))
    fruitpipe.transform(str(output), source=str(source), output=str(test_output), split="Test", quiet=True)
    return {"run": output, "test": test_output, "copies": copies, "leaked": leaked, "source": source}


@pytest.mark.spark
def test_every_planted_copy_is_found_and_no_two_distinct_demo_images_are(planted):
    found = fruitpipe.find_duplicates(str(planted["run"]), str(planted["test"]))
    groups = found.groups.to_pandas()
    group_of = dict(zip(groups["path"], groups["group_id"]))
    for copy, original in planted["copies"].items():
        assert copy in group_of and group_of[copy] == group_of[original], copy
    for _, members in groups.groupby("group_id"):
        distinct = [path for path in members["path"] if "/planted-" not in path]
        assert len(distinct) == 1, members["path"].tolist()  # one demo image per group: its copies, nothing else
    summary = found.summary
    assert summary["groups"] == len(ORIGINALS) and summary["images_in_groups"] == len(planted["copies"]) + 3
    assert summary["threshold_is_default"] and (groups["distance"] < summary["threshold"]).all()
    assert summary["cross_label_groups"] == 1
    assert summary["cross_label_examples"][0]["labels"] == ["Apple Golden 1", "Banana"]
    assert sum(b["images"] for b in summary["nn_distance_histogram"]) == summary["images"] == 72 + 10
    assert found.leaks.to_pylist() and [row["test_path"] for row in found.leaks.to_pylist()] == [planted["leaked"]]
    (nearest_training,) = found.leaks.column("train_path").to_pylist()  # the original or one of its copies
    assert group_of[nearest_training] == group_of[f"Training/{ORIGINALS[2]}"]
    assert summary["leaked_test_images"] == 1 and summary["leaked_per_class"] == {"Cherry Wax Red": 1}
    assert sum(b["images"] for b in summary["test_nn_distance_histogram"]) == summary["test_images"] == 24 + 1
    # The CNN's view: shares of images whose nearest training image is that similar in PCA space, as brute force.
    training = RunFolder.finished(str(planted["run"]))
    unit = _unit_rows(training.table("pca", ["pca"]).column("pca").to_pylist())
    test_features = RunFolder.finished(str(planted["test"])).table("features", ["features"]).column("features")
    test_unit = _unit_rows(training.pca_model().transform(np.array(test_features.to_pylist())))
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -1)
    for level in ("0.99", "0.995"):  # within one image: float rounding at the boundary
        expected = float(np.mean(similarity.max(axis=1) >= float(level)))
        assert summary["pca_cosine_nearest"]["training"][level] == pytest.approx(expected, abs=1 / 82)
        expected = float(np.mean((test_unit @ unit.T).max(axis=1) >= float(level)))
        assert summary["pca_cosine_nearest"]["test"][level] == pytest.approx(expected, abs=1 / 25)


def _unit_rows(rows) -> np.ndarray:
    matrix = np.array(rows, dtype=np.float64)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


@pytest.mark.spark
def test_duplicates_are_read_back_and_listed_in_the_manifest(planted, capsys):
    run_dir = str(planted["run"])
    assert main(["duplicates", run_dir, "--test", str(planted["test"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("3 near-duplicate groups holding 13 of 82 images (distance < 0.0012); 1 groups mix labels")
    assert out[1] == "1 of 25 test images have a training image that close: Cherry Wax Red 1"
    assert out[2].startswith("in PCA space (not copies, e.g. consecutive frames): ") and ">= 0.995" in out[2]
    folder = RunFolder.finished(run_dir)
    stored = folder.duplicates()
    assert stored.groups.num_rows == 13 and stored.leaks.num_rows == 1 and stored.summary["test_run"]
    listed = folder.manifest()["outputs"]["duplicates"]
    assert listed["groups_rows"] == 13 and listed["leaks_rows"] == 1
    assert folder.manifest()["outputs"]["features"]["rows"] == 82

    assert main(["duplicates", run_dir, "--threshold", "0.0001"]) == 0  # no test run: an older leaks file goes
    stored = folder.duplicates()
    assert stored.leaks is None and stored.summary["threshold"] == 0.0001 and not stored.summary["threshold_is_default"]
    assert folder.manifest()["outputs"]["duplicates"]["leaks_rows"] is None
    assert main(["duplicates", run_dir, "--threshold", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("fruitpipe: error: --threshold must be a positive "
                                                                "distance, got 0.0")


@pytest.mark.spark
def test_a_lost_source_is_one_line_and_unlisted_duplicates_are_not_read(planted, tmp_path):
    copied = tmp_path / "run"
    shutil.copytree(planted["run"], copied)
    fruitpipe.find_duplicates(str(copied))
    manifest = json.loads((copied / "manifest.json").read_text())
    (copied / "manifest.json").write_text(json.dumps({**manifest, "source": str(tmp_path / "moved")}))
    with pytest.raises(FruitpipeError, match=r"is gone: near-duplicates are judged on the pixels"):
        fruitpipe.find_duplicates(str(copied))
    assert RunFolder.finished(str(copied)).duplicates() is not None
    # A run committed again since (a resume) lists no duplicates: the files left from before are not read.
    manifest["outputs"].pop("duplicates")
    (copied / "manifest.json").write_text(json.dumps(manifest))
    assert RunFolder.finished(str(copied)).duplicates() is None


@pytest.mark.spark
def test_fingerprints_computed_in_spark_tasks_find_what_the_driver_finds(planted, tmp_path):
    """Above the threshold (lowered here) each shard's images are fingerprinted in a Spark task: the same groups,
    leaks and summary as on the driver, and a lost image is the same one line."""
    run_dir = tmp_path / "run"
    shutil.copytree(planted["run"], run_dir)
    config = build_config({}, {"source": str(run_dir), "output": str(run_dir), "engine": "spark"})
    on_driver = duplicates.find_duplicates(str(run_dir), config, str(planted["test"]))
    in_tasks = duplicates.find_duplicates(str(run_dir), config, str(planted["test"]), tasks_above_images=0)
    assert in_tasks.groups.num_rows == 13 and in_tasks.groups.equals(on_driver.groups)
    assert in_tasks.leaks.num_rows == 1 and in_tasks.leaks.equals(on_driver.leaks)
    assert in_tasks.summary == on_driver.summary
    assert not (run_dir / "_scratch").exists() or not any((run_dir / "_scratch").iterdir())

    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").write_text(json.dumps({**manifest, "source": str(tmp_path / "moved")}))
    with pytest.raises(FruitpipeError, match=r"^\S+/moved/Training/\S.* is gone: near-duplicates are judged on the"):
        duplicates.find_duplicates(str(run_dir), config, tasks_above_images=0)


@pytest.fixture(scope="module")
def s3_run(planted, moto):
    """The planted run uploaded to s3://fruitpipe-similarity/runs/planted; the bucket's client and the run's URI."""
    client = create_bucket(moto, "fruitpipe-similarity")
    upload_tree(client, Path(planted["run"]), "fruitpipe-similarity", "runs/planted")
    return client, "s3://fruitpipe-similarity/runs/planted"


@pytest.mark.spark
@pytest.mark.s3
def test_index_and_duplicates_on_an_s3_run_folder(planted, s3_run, s3_process_env):
    _, run_dir = s3_run
    described = fruitpipe.build_index(run_dir)
    assert described["kind"] == "flat" and described["count"] == 82
    folder = RunFolder.finished(run_dir)
    index = open_index(folder)
    first = np.array(folder.table("pca", ["pca"]).column("pca")[0].as_py(), dtype=np.float32)[None]
    distances, ids = index.search(first, 1)
    assert index.rows.num_rows == 82 and ids[0, 0] == 0 and distances[0, 0] < 1e-5
    found = fruitpipe.find_duplicates(run_dir, str(planted["test"]))
    assert found.summary["groups"] == 3 and found.summary["leaked_test_images"] == 1
    stored = RunFolder.finished(run_dir).duplicates()
    assert stored.groups.equals(found.groups) and stored.leaks.equals(found.leaks)
    outputs = RunFolder.finished(run_dir).manifest()["outputs"]
    assert outputs["index"]["spaces"]["pca"]["count"] == 82 and outputs["duplicates"]["groups_rows"] == 13


@pytest.mark.slow
@pytest.mark.spark
@pytest.mark.s3
def test_similar_against_an_s3_run_with_its_query_in_s3(planted, s3_run, moto, s3_process_env):
    """The query is staged in the run's scratch folder on S3, where executors read it: `fruitpipe similar` runs in a
    fresh process whose Spark workers get the S3 settings, as a user's would."""
    client, run_dir = s3_run
    fruitpipe.build_index(run_dir)
    client.put_object(Bucket="fruitpipe-similarity", Key="queries/Banana/photo.jpg",
                      Body=(planted["source"] / "Training" / ORIGINALS[0]).read_bytes())
    answered = fruitpipe_command(["similar", run_dir, "s3://fruitpipe-similarity/queries", "--k", "3", "--json"],
                                 s3_environment(moto))
    assert answered.returncode == 0, answered.stderr
    (query,) = json.loads(answered.stdout)["queries"]
    assert query["query"] == "s3://fruitpipe-similarity/queries/Banana/photo.jpg" and query["query_folder"] == "Banana"
    nearest = query["neighbours"][0]
    assert nearest["path"] == f"Training/{ORIGINALS[0]}" and nearest["distance"] < 1e-5
    assert object_keys(client, "fruitpipe-similarity", "runs/planted/_scratch") == []
