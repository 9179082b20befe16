"""Feature quality on held-out images, the classifiers behind it, and the notebook API around a finished run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

import fruitpipe
from fruitpipe import evaluate as evaluation
from fruitpipe.cli import main
from fruitpipe.errors import FruitpipeError


def _angles(*degrees: float) -> np.ndarray:
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_votes_ties_and_centroids_on_points_with_known_answers():
    train = _angles(1, 4, 2, 3, 30, 5, 170, 175, 180)
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    predicted = evaluation.predict(train, labels, _angles(0, 2.4, 178, 12), classes=3).labels
    # 0 deg: neighbours by rank are classes 0,1,1,0,2: a 2-2 tie that class 0 wins with the nearest neighbour.
    # 2.4 deg: 1,1,0,0,2: the same tie, won by class 1. 12 deg: its nearest is class 2 (5 deg), its five
    # nearest tie classes 0 and 1 (4 deg is nearer than 3 deg), and class 1's centroid (11.6 deg) is closest.
    assert predicted["1nn"].tolist() == [0, 1, 2, 2]
    assert predicted["5nn"].tolist() == [0, 1, 2, 0]
    assert predicted["centroid"].tolist() == [0, 0, 2, 1]


def test_predict_returns_each_test_rows_nearest_training_rows_nearest_first():
    train = _angles(1, 4, 2, 3, 30, 5, 170, 175, 180)
    predicted = evaluation.predict(train, np.array([0, 0, 1, 1, 1, 2, 2, 2, 2]), _angles(0, 178), classes=3)
    assert predicted.neighbours.tolist() == [[0, 2, 3, 1, 5], [8, 7, 6, 4, 5]]
    np.testing.assert_allclose(predicted.similarity[0], np.cos(np.deg2rad([1, 2, 3, 4, 5])), rtol=1e-6)
    assert np.all(np.diff(predicted.similarity, axis=1) <= 0)


def test_misclassified_examples_name_the_photo_its_prediction_and_its_nearest_training_photos():
    classes = ["Apple", "Banana", "Cherry"]
    train_y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    truth = np.array([0, 0, 2, 1])
    # 1-NN predicts 0, 1, 2, 2: the 2.4 deg Apple is taken for a Banana, the 12 deg Banana for a Cherry.
    predicted = evaluation.predict(_angles(1, 4, 2, 3, 30, 5, 170, 175, 180), train_y, _angles(0, 2.4, 178, 12), 3)
    scored = evaluation._Scored(2, classes, np.bincount(train_y), truth, predicted, 0, train_y,
                                [f"Training/{classes[y]}/{i}.jpg" for i, y in enumerate(train_y)],
                                [f"Test/{classes[y]}/{i}.jpg" for i, y in enumerate(truth)])
    examples = evaluation._misclassified(scored)
    assert [(e["path"], e["label"], e["predicted"]) for e in examples] == [
        ("Test/Apple/1.jpg", "Apple", "Banana"), ("Test/Banana/3.jpg", "Banana", "Cherry")]
    assert [n["path"] for n in examples[1]["neighbours"]] == [
        "Training/Cherry/5.jpg", "Training/Apple/1.jpg", "Training/Banana/3.jpg", "Training/Banana/2.jpg",
        "Training/Apple/0.jpg"]
    assert [n["label"] for n in examples[0]["neighbours"]] == ["Banana", "Banana", "Apple", "Apple", "Cherry"]
    np.testing.assert_allclose([n["similarity"] for n in examples[1]["neighbours"]],
                               np.cos(np.deg2rad([7, 8, 9, 10, 11])), rtol=1e-5)


def test_knn_matches_scikit_learn_cosine_neighbours_and_chunking_changes_nothing(monkeypatch):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(7, 16))
    train_y = rng.integers(0, 7, size=400)
    test_y = rng.integers(0, 7, size=150)
    train = centres[train_y] + rng.normal(scale=1.2, size=(400, 16))
    test = centres[test_y] + rng.normal(scale=1.2, size=(150, 16))
    ours = evaluation.predict(train, train_y, test, classes=7).labels
    for k, method in ((1, "1nn"), (5, "5nn")):
        reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train, train_y)
        theirs = reference.predict(test)
        if k == 5:
            neighbours = reference.kneighbors(test, return_distance=False)
            counts = np.stack([np.bincount(train_y[row], minlength=7) for row in neighbours])
            untied = np.sum(counts == counts.max(axis=1, keepdims=True), axis=1) == 1
            assert untied.sum() > 100
            np.testing.assert_array_equal(ours[method][untied], theirs[untied])
        else:
            np.testing.assert_array_equal(ours[method], theirs)
    monkeypatch.setattr(evaluation, "_CHUNK_ELEMENTS", 400 * 7)
    chunked = evaluation.predict(train, train_y, test, classes=7).labels
    for method in evaluation.METHODS:
        np.testing.assert_array_equal(chunked[method], ours[method])


@pytest.fixture(scope="module")
def evaluated(finished_run, demo_root, spark, tmp_path_factory):
    """A copy of the shared demo run (so its folder stays as other tests expect), evaluated through the CLI."""
    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(finished_run.output, run_dir)
    return run_dir


@pytest.mark.spark
def test_cli_evaluate_prints_accuracies_far_above_chance_and_pca_close_to_raw(evaluated, demo_root, capsys):
    assert main(["evaluate", str(evaluated), "--test", str(demo_root), "--quiet"]) == 0
    printed = capsys.readouterr().out
    document = json.loads((evaluated / "evaluation" / "evaluation.json").read_text())
    assert document["test_images"] == 24 and document["classes"] == 6 and document["split"] == "Test"
    assert document["chance"] == pytest.approx(1 / 6)
    assert document["test_images_unseen_class"] == 0 and document["test_images_failed"] == 0
    pca, raw = document["feature_sets"]["pca"], document["feature_sets"]["raw"]
    assert pca["dim"] == 10 and raw["dim"] == 1280
    for method in evaluation.METHODS:
        assert pca["accuracy"][method] >= 0.75 and raw["accuracy"][method] >= 0.75
        assert abs(pca["accuracy"][method] - raw["accuracy"][method]) <= 2 / 24 + 1e-9
    assert [row["test"] for row in document["per_class"]] == [4] * 6
    assert all(row["train"] == 12 for row in document["per_class"])
    assert "PCA-10" in printed and "raw 1280-d" in printed and "chance 16.7%" in printed
    pca_row = next(line for line in printed.splitlines() if line.startswith("PCA-10"))
    assert pca_row.split()[1:] == [f"{pca['accuracy'][m]:.1%}" for m in evaluation.METHODS]
    misclassified = document["misclassified_pca_1nn"]
    assert len(misclassified) == sum(min(evaluation.EXAMPLES_PER_CONFUSION, pair["images"])
                                     for pair in document["most_confused_pca_1nn"])
    for example in misclassified:
        assert example["label"] != example["predicted"] and example["path"].startswith(f"Test/{example['label']}/")
        assert (demo_root / example["path"]).is_file()
        neighbours = example["neighbours"]
        assert len(neighbours) == 5 and neighbours[0]["label"] == example["predicted"]
        assert all(n["path"].startswith(f"Training/{n['label']}/") for n in neighbours)
        assert [n["similarity"] for n in neighbours] == sorted((n["similarity"] for n in neighbours), reverse=True)
    held_out = fruitpipe.load_run(str(evaluated / "evaluation" / "test_run")).metadata()
    assert len(held_out) == 24 and set(held_out["split"]) == {"Test"}


def test_evaluate_refuses_a_folder_that_is_not_a_run(capsys, demo_root, tmp_path):
    assert main(["evaluate", str(tmp_path), "--test", str(demo_root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a fruitpipe run folder" in err


def test_import_fruitpipe_stays_light():
    code = ("import sys, fruitpipe; heavy = ['pyspark', 'pandas', 'pyarrow', 'numpy', 'matplotlib', 'onnxruntime', "
            "'torch']; print([m for m in heavy if m in sys.modules]); print(fruitpipe.RunConfig.__name__)")
    lines = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert lines == ["[]", "RunConfig"]


@pytest.mark.spark
def test_load_run_gives_back_the_run_result_and_its_loaders(finished_run):
    loaded = fruitpipe.load_run(finished_run.output)
    for name in ("images_listed", "images_ok", "images_failed", "shards_total", "pca_k", "model", "feature_dim"):
        assert getattr(loaded, name) == getattr(finished_run, name)
    assert loaded.variance_kept == pytest.approx(finished_run.variance_kept)
    assert loaded.seconds["total"] > 0 and loaded.images_per_second > 0
    ours = loaded.pca().set_index("image_id").sort_index()
    theirs = finished_run.pca().set_index("image_id").sort_index()
    np.testing.assert_array_equal(np.stack(ours["pca"]), np.stack(theirs["pca"]))
    assert loaded.arrow("metadata").num_rows == finished_run.images_listed


def test_run_takes_a_config_or_keywords_but_not_both(tmp_path):
    config = fruitpipe.RunConfig(source=str(tmp_path), output=str(tmp_path / "out"))
    with pytest.raises(FruitpipeError, match="not both"):
        fruitpipe.run(config, pca_k=3)
    with pytest.raises(FruitpipeError, match="unknown option pca_kk"):
        fruitpipe.run(source=str(tmp_path), output=str(tmp_path / "out"), pca_kk=3)


@pytest.mark.spark
def test_a_large_run_is_scored_against_a_sample_of_its_training_shards(finished_run, demo_root, monkeypatch,
                                                                      tmp_path):
    """Above evaluate.TRAIN_ROWS_READ training rows, whole shards spread over the run are read, and the document
    says how many training images were scored."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.output, run_dir)
    monkeypatch.setattr(evaluation, "TRAIN_ROWS_READ", finished_run.images_ok // 2)
    assert main(["evaluate", str(run_dir), "--test", str(demo_root), "--quiet"]) == 0
    document = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())
    assert document["train_images"] == finished_run.images_ok
    assert 0 < document["train_images_scored"] <= finished_run.images_ok // 2 + finished_run.shards_total
    assert document["train_images_scored"] == sum(row["train"] for row in document["per_class"])
    assert all(0.0 <= document["feature_sets"][name]["accuracy"][method] <= 1.0
               for name in ("pca", "raw") for method in evaluation.METHODS)
