"""How good are a run's features? 1-NN, 5-NN and nearest-centroid accuracy on held-out images.

The test images go through `pipeline.transform` (the run's own ONNX model and fitted PCA, no refit), then simple
classifiers fitted on the run's training features label them: a feature set is useful exactly when images of
a class sit near each other. Similarity is cosine after subtracting the training mean (the PCA rows are already
centred on it), so raw 1280-d features and their PCA projection are compared on the same footing: the gap is
what the dropped components carried. numpy only; test rows are scored in chunks so memory stays bounded, and a
run of more than TRAIN_ROWS_READ images is scored against a sample of its shards.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe import sinks
from fruitpipe.config import RunConfig
from fruitpipe.errors import FruitpipeError
from fruitpipe.run_folder import (
    EVALUATION_RUN,
    FEATURES,
    PCA,
    RunFolder,
)

METHODS = ("1nn", "5nn", "centroid")
METHOD_TITLES = {"1nn": "1-NN", "5nn": "5-NN", "centroid": "centroid"}
METRIC = "cosine similarity after subtracting the training mean"
FEATURE_SETS = (("pca", PCA, "pca"), ("raw", FEATURES, "features"))
NEIGHBOURS = 5
_CHUNK_ELEMENTS = 16_000_000
_TIE_BREAK = 1e-3
EXAMPLES_PER_CONFUSION = 3
# Training rows scored at most: a larger run is scored against a sample of whole shards spread over it (which
# `train_images_scored` records), so the driver holds at most 100,000 x 1280 float32 raw features (0.5 GB) however
# large the run; FULL Fruits-360 (67,692) is scored whole.
TRAIN_ROWS_READ = 100_000


def default_work_dir(run_dir: str) -> str:
    """Where the held-out images' features go unless told otherwise: inside the run folder."""
    return f"{run_dir.rstrip('/')}/{EVALUATION_RUN}"


@dataclass(frozen=True)
class Predictions:
    """Predicted class indices of the test rows per method, and each row's nearest training rows (nearest first)
    with their similarities: the report shows a misclassified photo beside them."""

    labels: dict[str, np.ndarray]
    neighbours: np.ndarray
    similarity: np.ndarray


def predict(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, classes: int) -> Predictions:
    """Predicted class indices of every test row by 1-NN, 5-NN majority vote and nearest centroid.

    Inputs must already be centred. 5-NN ties go to the tied class holding the nearest neighbour.
    """
    train_unit, test_unit = _unit_rows(train), _unit_rows(test)
    centroids = np.zeros((classes, train.shape[1]), dtype=np.float64)
    np.add.at(centroids, train_labels, train_unit)
    k = min(NEIGHBOURS, train.shape[0])
    weights = 1.0 + _TIE_BREAK * 0.5 ** np.arange(k)
    neighbours, similarities = [np.zeros((0, k), dtype=np.int64)], [np.zeros((0, k), dtype=np.float32)]
    voted = [np.zeros(0, dtype=np.int64)]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, train.shape[0]))
    for start in range(0, test.shape[0], chunk):
        similarity = test_unit[start:start + chunk] @ train_unit.T
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
        nearest = np.take_along_axis(top, order, axis=1)
        labels = train_labels[nearest]
        votes = np.zeros((labels.shape[0], classes))
        np.add.at(votes, (np.arange(labels.shape[0])[:, None], labels), weights)
        neighbours.append(nearest)
        similarities.append(np.take_along_axis(similarity, nearest, axis=1))
        voted.append(np.argmax(votes, axis=1))
    nearest_rows = np.concatenate(neighbours)
    return Predictions(labels={"1nn": train_labels[nearest_rows[:, 0]], "5nn": np.concatenate(voted),
                               "centroid": np.argmax(test_unit @ _unit_rows(centroids).T, axis=1)},
                       neighbours=nearest_rows, similarity=np.concatenate(similarities))


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class _Scored:
    """One feature set scored: class names, true and predicted indices of the test rows the run has classes for,
    and the class indices and paths of the training rows and the paths of those test rows."""

    dim: int
    classes: list[str]
    train_counts: np.ndarray
    truth: np.ndarray
    predictions: Predictions
    unseen: int
    train_truth: np.ndarray
    train_paths: list[str]
    test_paths: list[str]

    def accuracy(self, method: str, members: np.ndarray | None = None) -> float | None:
        chosen = self.truth if members is None else self.truth[members]
        if chosen.size == 0:
            return None
        predicted = self.predictions.labels[method]
        if members is not None:
            predicted = predicted[members]
        return float(np.mean(predicted == chosen))


def _labelled_matrix(run_dir: str, directory: str, column: str,
                     at_most: int | None = None) -> tuple[np.ndarray, list[str], list[str]]:
    try:
        table = RunFolder(run_dir).table(directory, columns=["path", "label", column], at_most=at_most)
    except (OSError, pa.ArrowException) as exc:
        raise FruitpipeError(f"cannot read {run_dir.rstrip('/')}/{directory} (a torn or missing Parquet part: "
                             f"{str(exc).strip().splitlines()[0]}); run the command that wrote it again") from None
    return sinks.vectors_matrix(table, column), table.column("label").to_pylist(), table.column("path").to_pylist()


def _score(run_dir: str, test_dir: str, directory: str, column: str) -> _Scored:
    train, train_names, train_paths = _labelled_matrix(run_dir, directory, column, at_most=TRAIN_ROWS_READ)
    test, test_names, test_paths = _labelled_matrix(test_dir, directory, column)
    classes = sorted(set(train_names))
    index = {label: i for i, label in enumerate(classes)}
    seen = np.array([label in index for label in test_names], dtype=bool)
    train_y = np.array([index[label] for label in train_names], dtype=np.int64)
    test_y = np.array([index[label] for label, keep in zip(test_names, seen) if keep], dtype=np.int64)
    mean = train.astype(np.float64).mean(axis=0)
    predictions = predict(train - mean, train_y, test[seen] - mean, len(classes))
    return _Scored(int(train.shape[1]), classes, np.bincount(train_y, minlength=len(classes)), test_y, predictions,
                   int((~seen).sum()), train_y, train_paths, [path for path, keep in zip(test_paths, seen) if keep])


def evaluate(run_dir: str, config: RunConfig) -> dict:
    """Extract the held-out images of `config` with the run's model, score them, write evaluation.json."""
    from fruitpipe.pipeline import transform

    started = time.perf_counter()
    folder = RunFolder.finished(run_dir)
    trained = folder.result()
    tested = transform(run_dir, config)
    if tested.images_ok == 0:
        raise FruitpipeError(f"none of the {tested.images_listed} test images could be processed; "
                             f"see {tested.output}/errors")
    scores = {name: _score(run_dir, tested.output, directory, column) for name, directory, column in FEATURE_SETS}
    reference = scores["pca"]
    if reference.truth.size == 0:
        raise FruitpipeError(f"none of the {tested.images_ok} test images belongs to a class of the run "
                             f"({', '.join(reference.classes[:5])}, ...)")
    test_counts = np.bincount(reference.truth, minlength=len(reference.classes))
    per_class = []
    for position, label in enumerate(reference.classes):
        row: dict[str, Any] = {"label": label, "train": int(reference.train_counts[position]),
                               "test": int(test_counts[position])}
        for name, scored in scores.items():
            row[name] = {method: scored.accuracy(method, scored.truth == position) for method in METHODS}
        per_class.append(row)
    document = {
        "run_dir": run_dir, "test_source": config.source, "split": config.split, "test_run": tested.output,
        "metric": METRIC, "methods": METHOD_TITLES, "classes": len(reference.classes),
        "train_images": trained.images_ok, "train_images_scored": int(reference.train_counts.sum()),
        "test_images": int(test_counts.sum()),
        "test_images_failed": tested.images_failed, "test_images_unseen_class": reference.unseen,
        "chance": 1.0 / len(reference.classes), "majority_class": float(test_counts.max() / max(1, test_counts.sum())),
        "feature_sets": {name: {"dim": scored.dim, "accuracy": {m: scored.accuracy(m) or 0.0 for m in METHODS}}
                         for name, scored in scores.items()},
        "per_class": per_class,
        "most_confused_pca_1nn": _confusions(reference.truth, reference.predictions.labels["1nn"], reference.classes),
        "misclassified_pca_1nn": _misclassified(reference),
        "seconds": time.perf_counter() - started,
    }
    folder.write_evaluation(document)
    return document


def _confusions(truth: np.ndarray, predicted: np.ndarray, classes: list[str], top: int = 10) -> list[dict]:
    wrong = truth != predicted
    pairs = Counter(zip(truth[wrong].tolist(), predicted[wrong].tolist()))
    ranked = sorted(pairs.items(), key=lambda item: (-item[1], item[0]))[:top]
    return [{"true": classes[t], "predicted": classes[p], "images": n} for (t, p), n in ranked]


def _misclassified(scored: _Scored) -> list[dict[str, Any]]:
    """Test images PCA 1-NN labels wrong, with their nearest training images (paths relative to each run's
    source): up to EXAMPLES_PER_CONFUSION of each of the most confused class pairs, the most confident first."""
    predicted, neighbours = scored.predictions.labels["1nn"], scored.predictions.neighbours
    similarity = scored.predictions.similarity
    chosen = []
    for pair in _confusions(scored.truth, predicted, scored.classes):
        true, wrong = scored.classes.index(pair["true"]), scored.classes.index(pair["predicted"])
        rows = np.flatnonzero((scored.truth == true) & (predicted == wrong)).tolist()
        chosen.extend(sorted(rows, key=lambda row: (-similarity[row, 0], scored.test_paths[row]))
                      [:EXAMPLES_PER_CONFUSION])
    return [{"path": scored.test_paths[row], "label": scored.classes[scored.truth[row]],
             "predicted": scored.classes[predicted[row]],
             "neighbours": [{"path": scored.train_paths[train_row],
                             "label": scored.classes[scored.train_truth[train_row]], "similarity": float(value)}
                            for train_row, value in zip(neighbours[row].tolist(), similarity[row].tolist())]}
            for row in chosen]


def format_table(document: Mapping[str, Any], worst: int = 5) -> str:
    """The evaluation as a short text table: accuracy per feature set and method, then the weakest classes."""
    header = f"{'features':<18}" + "".join(f"{METHOD_TITLES[m]:>10}" for m in METHODS)
    lines = [header]
    for name, values in document["feature_sets"].items():
        title = f"PCA-{values['dim']}" if name == "pca" else f"raw {values['dim']}-d"
        lines.append(f"{title:<18}" + "".join(f"{values['accuracy'][m]:>10.1%}" for m in METHODS))
    lines.append(f"{document['test_images']} test images, {document['classes']} classes, chance "
                 f"{document['chance']:.1%} (majority class {document['majority_class']:.1%}); {document['metric']}")
    if document["test_images_unseen_class"] or document["test_images_failed"]:
        lines.append(f"left out: {document['test_images_unseen_class']} test images of classes the run never saw, "
                     f"{document['test_images_failed']} that could not be read")
    scored = [row for row in document["per_class"] if row["test"] and row["pca"]["1nn"] is not None]
    weakest = sorted(scored, key=lambda row: (row["pca"]["1nn"], row["label"]))[:worst]
    if weakest and weakest[0]["pca"]["1nn"] < 1.0:
        lines.append("weakest classes (PCA 1-NN): " + ", ".join(
            f"{row['label']} {row['pca']['1nn']:.0%}" for row in weakest if row["pca"]["1nn"] < 1.0))
    return "\n".join(lines)
