"""The nearest-neighbour index of a run and `similar` (issue 12 parts 1 and 2): a training image finds itself at
distance ~0, the k-NN vote on the held-out Test split is evaluate's 5-NN, the approximate index keeps recall@10
>= 0.95 against exact on 20,000 vectors, the index is listed in the manifest, and bad input is one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

import fruitpipe
from fruitpipe import evaluate as evaluation
from fruitpipe import sinks
from fruitpipe import index as neighbours
from fruitpipe.cli import main
from fruitpipe.config import SPARK_ENGINE, build_config
from fruitpipe.distributors import open_distributor
from fruitpipe.errors import FruitpipeError
from fruitpipe.run_folder import RunFolder


@pytest.fixture(scope="module")
def indexed(finished_run, tmp_path_factory):
    """A copy of the shared demo run (its manifest must stay as other tests expect) with its PCA index built."""
    run_dir = tmp_path_factory.mktemp("indexed") / "run"
    shutil.copytree(finished_run.output, run_dir)
    fruitpipe.build_index(str(run_dir))
    return run_dir


def _cosine_neighbours(train: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarity = queries @ train.T
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return 1 - np.take_along_axis(similarity, order, axis=1), order


@pytest.mark.spark
def test_saved_index_is_listed_in_the_manifest_and_answers_like_a_brute_force_search(indexed):
    folder = RunFolder.finished(str(indexed))
    manifest = folder.manifest()
    assert manifest["outputs"]["index"]["spaces"] == {"pca": {"kind": "flat", "metric": "cosine", "count": 72,
                                                              "dim": 10}}
    assert manifest["outputs"]["pca"]["rows"] == 72  # the tables are still listed
    index = neighbours.open_index(folder)
    vectors = neighbours.run_vectors(folder, "pca")
    distances, ids = index.search(vectors.matrix[:7], 5)
    expected_distances, expected_ids = _cosine_neighbours(vectors.matrix, vectors.matrix[:7], 5)
    np.testing.assert_allclose(distances, expected_distances, atol=1e-5)
    assert (ids[:, 0] == np.arange(7)).all() and (ids == expected_ids).mean() > 0.9  # ties may swap
    assert index.rows.column("path").to_pylist() == vectors.rows.column("path").to_pylist()


@pytest.mark.spark
def test_features_space_in_l2_matches_euclidean_distances(indexed, capsys):
    assert main(["index", str(indexed), "--space", "features", "--metric", "l2"]) == 0
    assert "flat l2 index of 72 features vectors (1280-d)" in capsys.readouterr().out
    folder = RunFolder.finished(str(indexed))
    assert set(folder.manifest()["outputs"]["index"]["spaces"]) == {"pca", "features"}
    index = neighbours.open_index(folder, "features")
    matrix = neighbours.run_vectors(folder, "features").matrix
    distances, ids = index.search(matrix[:3], 4)
    expected = np.linalg.norm(matrix[:3, None, :] - matrix[None, :, :], axis=2)
    np.testing.assert_allclose(distances, np.sort(expected, axis=1)[:, :4], rtol=1e-4, atol=1e-3)


@pytest.mark.spark
def test_similar_finds_the_image_itself_and_votes_on_test_images_as_evaluate_does(indexed, demo_root):
    training_image = demo_root / "Training" / "Banana" / "0_100.jpg"
    assert training_image.is_file()
    found = fruitpipe.similar(str(indexed), [str(training_image), str(demo_root / "Test")], k=5)
    assert found.attrs["failed"] == [] and not (indexed / "_scratch").exists()  # the staged queries are gone
    itself = found[found["query"] == str(training_image)]
    assert itself["rank"].tolist() == [1, 2, 3, 4, 5]
    assert itself["path"].iloc[0] == "Training/Banana/0_100.jpg" and itself["distance"].iloc[0] < 1e-5
    assert itself["distance"].is_monotonic_increasing and itself["vote_label"].iloc[0] == "Banana"

    tests = found[found["query"] != str(training_image)].groupby("query").first()
    assert len(tests) == 24 and tests["query_folder"].nunique() == 6
    scores = fruitpipe.evaluate_run(str(indexed), str(demo_root), quiet=True)
    accuracy = float((tests["vote_label"] == tests["query_folder"]).mean())
    assert accuracy == scores["feature_sets"]["pca"]["accuracy"]["5nn"]
    # Image by image too: evaluate's 5-NN on the same vectors (its own held-out extraction) gives the same labels.
    train = RunFolder.finished(str(indexed)).table("pca", columns=["label", "pca"])
    held_out = RunFolder.finished(scores["test_run"]).table("pca", columns=["path", "pca"])
    classes = sorted(set(train.column("label").to_pylist()))
    train_y = np.array([classes.index(label) for label in train.column("label").to_pylist()])
    train_x = sinks.vectors_matrix(train, "pca")
    mean = train_x.astype(np.float64).mean(axis=0)
    predicted = evaluation.predict(train_x - mean, train_y, sinks.vectors_matrix(held_out, "pca") - mean,
                                   len(classes)).labels["5nn"]
    by_path = dict(zip(held_out.column("path").to_pylist(), (classes[i] for i in predicted)))
    voted = {query.split("/Test/", 1)[1]: label for query, label in tests["vote_label"].items()}
    assert voted == {path.split("Test/", 1)[1]: label for path, label in by_path.items()}


@pytest.mark.spark
def test_cli_similar_prints_neighbours_and_json(indexed, demo_root, capsys, tmp_path):
    image = str(demo_root / "Training" / "Cherry Wax Red" / "3_100.jpg")
    assert main(["similar", str(indexed), image, "--k", "3", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    (query,) = document["queries"]
    assert query["query"] == image and query["vote_label"] == "Cherry Wax Red" and len(query["neighbours"]) == 3
    nearest = query["neighbours"][0]
    assert nearest["path"] == "Training/Cherry Wax Red/3_100.jpg" and nearest["distance"] < 1e-5
    assert document["failed"] == []
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a photo")
    assert main(["similar", str(indexed), image, str(broken), "--k", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert captured.err.strip().splitlines()[-1].startswith(f"fruitpipe: {broken} could not be processed: ")
    assert lines[0].startswith(f"{image}: Cherry Wax Red (") and lines[0].endswith("% of 2 neighbours)")
    assert lines[1].split()[:3] == ["1", "0.0000", "Cherry"] and len(lines) == 3


@pytest.mark.spark
def test_similar_answers_every_query_whatever_the_config_file_selects(indexed, demo_root, capsys, tmp_path):
    """A config file written for runs (a preset, classes, per-class and total caps) must not drop query images."""
    config = tmp_path / "fruitpipe.yaml"
    config.write_text("mode: apples\nclasses: [Apple*]\nper_class: 1\nlimit: 1\n")
    images = [demo_root / "Training" / "Banana" / "0_100.jpg", demo_root / "Training" / "Banana" / "1_100.jpg",
              demo_root / "Training" / "Cherry Wax Red" / "3_100.jpg"]
    assert main(["--config", str(config), "similar", str(indexed), *map(str, images), "--k", "1", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["failed"] == []
    found = {query["query"]: query["neighbours"][0]["path"] for query in document["queries"]}
    assert found == {str(image): str(image.relative_to(demo_root)) for image in images}


def _clustered(count: int, centres: np.ndarray, seed: int) -> np.ndarray:
    """Points around `centres` (synthetic clustered vectors, like classes of photos)."""
    rng = np.random.default_rng(seed)
    noise = 0.35 * rng.normal(size=(count, centres.shape[1])).astype(np.float32)
    return centres[rng.integers(0, len(centres), count)] + noise


def test_approximate_index_keeps_recall_at_10_of_95_percent_against_exact_on_20000_vectors():
    centres = np.random.default_rng(0).normal(size=(60, 50)).astype(np.float32)
    data = _clustered(20_000, centres, seed=1)
    queries = _clustered(500, centres, seed=2)  # not in the index
    rows = pa.table({"image_id": [str(i) for i in range(len(data))]})
    for metric in neighbours.METRICS:
        approximate = neighbours.build(neighbours.RunVectors(rows, data), "pca", metric, exact_below=10_000)
        assert approximate.description["kind"] == "ivf" and approximate.description["count"] == 20_000
        assert approximate.description["recall_at_10"] >= 0.95
        exact = neighbours.build(neighbours.RunVectors(rows, data), "pca", metric)
        assert exact.description["kind"] == "flat"
        found = approximate.search(queries, 10)[1]
        truth = exact.search(queries, 10)[1]
        assert neighbours.recall_at(found, truth) >= 0.95


@pytest.mark.spark
def test_an_index_built_in_spark_tasks_is_the_index_the_driver_builds(indexed, tmp_path):
    """Read, assigned and searched shard by shard in Spark tasks and merged on the driver, the index holds the same
    rows in the same lists (same training sample), answers every query alike and measured the same recall."""
    run_dir = tmp_path / "run"
    shutil.copytree(indexed, run_dir)
    config = build_config({}, {"source": str(run_dir), "output": str(run_dir)})
    folder = RunFolder.finished(str(run_dir))
    with open_distributor(SPARK_ENGINE, config, 4) as distributor:
        for space, metric, exact_below in (("pca", "cosine", 10), ("features", "l2", 10), ("pca", "cosine", 1000)):
            centre = neighbours.space_centre(folder, space)
            vectors = neighbours.run_vectors(folder, space)
            in_tasks = neighbours.build_in_tasks(folder, distributor, space, metric, centre, exact_below)
            on_driver = neighbours.build(vectors, space, metric, centre, exact_below)
            timing = {"build_seconds", "built_in"}
            assert {key: value for key, value in in_tasks.description.items() if key not in timing} \
                == {key: value for key, value in on_driver.description.items() if key not in timing}
            assert in_tasks.description["kind"] == ("ivf" if exact_below == 10 else "flat")
            assert in_tasks.rows.equals(on_driver.rows)
            (task_distances, task_ids), (driver_distances, driver_ids) = (built.search(vectors.matrix, 10)
                                                                          for built in (in_tasks, on_driver))
            np.testing.assert_array_equal(task_ids, driver_ids)
            np.testing.assert_allclose(task_distances, driver_distances, atol=1e-6)

        described = neighbours.build_index(str(run_dir), config, exact_below=10, tasks_above_bytes=0)
    assert described["built_in"] == "spark" and described["kind"] == "ivf"
    saved = neighbours.open_index(RunFolder.finished(str(run_dir)))
    assert saved.search(neighbours.run_vectors(folder, "pca").matrix[:5], 1)[1][:, 0].tolist() == list(range(5))


def test_vote_takes_the_majority_and_breaks_ties_by_the_nearest():
    assert neighbours.vote(["a", "b", "b", "c", "a", "b"]) == ("b", 0.5)
    assert neighbours.vote(["c", "a", "a", "c"]) == ("c", 0.5)


@pytest.mark.spark
def test_bad_input_is_one_line(indexed, finished_run, demo_root, capsys, tmp_path):
    with pytest.raises(FruitpipeError, match="has no pca index; build it with `fruitpipe index"):
        neighbours.open_index(RunFolder.finished(finished_run.output))
    resumed = tmp_path / "resumed"  # a run committed again since (a resume): its manifest lists no index
    shutil.copytree(indexed, resumed)
    manifest = json.loads((resumed / "manifest.json").read_text())
    del manifest["outputs"]["index"]
    (resumed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FruitpipeError, match="index of .* is older than its outputs"):
        neighbours.open_index(RunFolder.finished(str(resumed)))
    assert main(["similar", str(indexed), str(demo_root / "no-such.jpg")]) == 2
    assert capsys.readouterr().err.strip() == f"fruitpipe: error: query not found: {demo_root / 'no-such.jpg'}"
