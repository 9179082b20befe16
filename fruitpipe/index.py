"""A nearest-neighbour index per run, and `similar`: the run's training images nearest to new photos.

The index (faiss, the `driver` extra) holds a finished run's PCA vectors (`space="pca"`, default) or its raw
features (`space="features"`). Cosine distance (1 - cosine similarity, on vectors centred on the training mean: the
PCA rows already are, raw features are centred with the PCA's mean, so it is `evaluate`'s metric) is the default;
`metric="l2"` gives Euclidean distance. Below EXACT_BELOW vectors the index is exact (flat); above it an IVF index
(trained on a sample of the vectors) whose nprobe is raised until recall@10 against exact search, measured on
RECALL_QUERIES of the indexed vectors (each query's own id left out), reaches RECALL_GOAL; the recall found is
stored with the index. A query goes through `pipeline.transform` (the run's own model and PCA), so a photo is
compared exactly as the run's images were.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from fruitpipe import sinks
from fruitpipe.config import SPLITS, RunConfig
from fruitpipe.dataset import IMAGE_SUFFIXES
from fruitpipe.errors import FruitpipeError
from fruitpipe.extras import needs_extras
from fruitpipe.run_folder import ERRORS, FEATURES, INDEX, PCA, RunFolder, StoredIndex
from fruitpipe.storage import find_files, locate, read_bytes, write_bytes

if TYPE_CHECKING:
    import faiss
    import pandas as pd

# Space name -> (table, vector column).
SPACES = {"pca": (PCA, "pca"), "features": (FEATURES, "features")}
COSINE = "cosine"
L2 = "l2"
METRICS = (COSINE, L2)
FLAT = "flat"
IVF = "ivf"
# Exact search below this many vectors: a flat scan of 50,000 x 50 floats answers a query in about a millisecond.
EXACT_BELOW = 50_000
RECALL_K = 10
RECALL_GOAL = 0.97
RECALL_QUERIES = 1_000
# IVF lists: about sqrt(N), trained on at most this many vectors per list (faiss asks for 39 or more).
TRAIN_PER_LIST = 64
_SEED = 0
_KEY_COLUMNS = ["image_id", "path", "label"]


def _faiss() -> Any:
    with needs_extras("a nearest-neighbour index"):
        import faiss
    return faiss


@dataclass(frozen=True)
class RunVectors:
    """A run's vectors in one space, as stored (not yet centred or normalised), and the image of each row."""

    rows: pa.Table
    matrix: np.ndarray


def run_vectors(folder: RunFolder, space: str) -> RunVectors:
    """The vectors of `space` of a finished run, with image_id, path and label per row."""
    table, column = _space(space)
    data = folder.table(table, columns=[*_KEY_COLUMNS, column])
    return RunVectors(data.select(_KEY_COLUMNS), sinks.vectors_matrix(data, column))


def _space(space: str) -> tuple[str, str]:
    if space not in SPACES:
        raise FruitpipeError(f"unknown space {space!r}: choose one of {', '.join(SPACES)}")
    return SPACES[space]


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise FruitpipeError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")


def space_centre(folder: RunFolder, space: str) -> np.ndarray | None:
    """What cosine subtracts before normalising: the training mean of raw features (the PCA's mean); PCA vectors
    are centred already."""
    return folder.pca_model().mean.astype(np.float32) if space == "features" else None


def prepared(matrix: np.ndarray, metric: str, centre: np.ndarray | None) -> np.ndarray:
    """Vectors as the index holds them: centred and unit length for cosine, as they are for L2."""
    vectors = np.asarray(matrix, dtype=np.float32)
    if metric == COSINE:
        if centre is not None:
            vectors = vectors - centre
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


class NeighbourIndex:
    """A faiss index over a run's vectors in one space, searched with distances in the metric's own units."""

    def __init__(self, index: faiss.Index, rows: pa.Table, description: dict[str, Any],
                 centre: np.ndarray | None) -> None:
        self.index = index
        self.rows = rows
        self.description = description
        self.centre = centre

    @property
    def metric(self) -> str:
        return str(self.description["metric"])

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances and row ids of the k nearest indexed vectors to each of `vectors` (stored form), nearest
        first; ids are -1 where fewer than k were found."""
        distances, ids = self.index.search(prepared(vectors, self.metric, self.centre), min(k, self.index.ntotal))
        return _distances(distances, self.metric), ids


def _distances(scores: np.ndarray, metric: str) -> np.ndarray:
    """faiss's scores as distances: 1 - inner product of unit vectors (cosine), square root of squared L2."""
    if metric == COSINE:
        return np.maximum(1.0 - scores, 0.0).astype(np.float32)
    return np.sqrt(np.maximum(scores, 0.0)).astype(np.float32)


def build(vectors: RunVectors, space: str, metric: str = COSINE, centre: np.ndarray | None = None,
          exact_below: int = EXACT_BELOW) -> NeighbourIndex:
    """An index over `vectors` (`space` names them in its description): flat below `exact_below` vectors, else IVF
    tuned to RECALL_GOAL (measured)."""
    _check_metric(metric)
    faiss = _faiss()
    started = time.perf_counter()
    data = prepared(vectors.matrix, metric, centre)
    count, dim = data.shape
    if count < 2:
        raise FruitpipeError(f"an index needs at least 2 vectors; the run holds {count}")
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == COSINE else faiss.METRIC_L2
    flat = faiss.IndexFlat(dim, faiss_metric)
    flat.add(data)
    description: dict[str, Any] = {"space": space, "metric": metric, "count": count, "dim": dim,
                                   "faiss": faiss.__version__}
    if count < exact_below:
        index, tuning = flat, {"kind": FLAT, "recall_at_10": 1.0}
    else:
        index, tuning = _ivf(faiss, data, flat, faiss_metric)
    description.update(tuning, build_seconds=round(time.perf_counter() - started, 3))
    return NeighbourIndex(index, vectors.rows, description, centre)


def _ivf(faiss: Any, data: np.ndarray, flat: Any, faiss_metric: int) -> tuple[Any, dict[str, Any]]:
    """An IVF-flat index trained on a sample of `data`, with the smallest power-of-two nprobe whose measured
    recall@10 against `flat` reaches RECALL_GOAL."""
    count, dim = data.shape
    lists = max(16, int(np.sqrt(count)))
    rng = np.random.default_rng(_SEED)
    sample = data[rng.choice(count, size=min(count, lists * TRAIN_PER_LIST), replace=False)]
    index = faiss.IndexIVFFlat(faiss.IndexFlat(dim, faiss_metric), dim, lists, faiss_metric)
    index.cp.seed = _SEED
    index.train(sample)
    index.add(data)
    query_ids = rng.choice(count, size=min(count, RECALL_QUERIES), replace=False)
    exact = _without_self(flat.search(data[query_ids], RECALL_K + 1)[1], query_ids)
    nprobe, recall = 1, 0.0
    while True:
        index.nprobe = nprobe
        found = _without_self(index.search(data[query_ids], RECALL_K + 1)[1], query_ids)
        recall = recall_at(found, exact)
        if recall >= RECALL_GOAL or nprobe >= lists:
            break
        nprobe = min(lists, nprobe * 2)
    return index, {"kind": IVF, "lists": lists, "nprobe": nprobe, "trained_on": int(sample.shape[0]),
                   "recall_at_10": round(recall, 4), "recall_queries": int(query_ids.size)}


def _without_self(ids: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """The first RECALL_K ids of each row that are not the query itself."""
    return np.array([[i for i in row if i != own][:RECALL_K] for row, own in zip(ids.tolist(), query_ids.tolist())])


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact neighbours that `found` holds (recall@k for k = the row length)."""
    hits = sum(len(set(f) & set(e)) for f, e in zip(found.tolist(), exact.tolist()))
    return hits / max(1, exact.size)


def build_index(run_dir: str, space: str = "pca", metric: str = COSINE,
                exact_below: int = EXACT_BELOW) -> dict[str, Any]:
    """Build the index of a finished run's `space` and save it under RUN_DIR/index/ (listed in the manifest);
    returns its description."""
    _space(space)
    _check_metric(metric)
    folder = RunFolder.finished(run_dir)
    centre = space_centre(folder, space)
    built = build(run_vectors(folder, space), space, metric, centre, exact_below)
    faiss = _faiss()
    folder.withdraw_output(INDEX)
    folder.write_index(space, faiss.serialize_index(built.index).tobytes(), built.rows, built.description)
    folder.list_outputs()
    return built.description


def open_index(folder: RunFolder, space: str = "pca") -> NeighbourIndex:
    """The saved index of `space` (refused in one line when `fruitpipe index` has not built it)."""
    _space(space)
    stored: StoredIndex = folder.index(space)
    faiss = _faiss()
    index = faiss.deserialize_index(np.frombuffer(stored.data, dtype=np.uint8))
    if "nprobe" in stored.description:
        index.nprobe = int(stored.description["nprobe"])
    return NeighbourIndex(index, stored.rows, stored.description, space_centre(folder, space))


def vote(labels: Sequence[str]) -> tuple[str, float]:
    """The majority label of neighbours listed nearest first, and its share; a tie goes to the tied label of the
    nearest neighbour (evaluate's k-NN rule)."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    most = max(counts.values())
    winner = next(label for label in labels if counts[label] == most)
    return winner, most / len(labels)


# -- similar: new photos against a run ------------------------------------------------------------------------------

QUERY_COLUMNS = ["query", "query_folder", "rank", "path", "label", "distance", "vote_label", "vote_share"]
# The selection of the query run: every staged query, whatever a config file selects for runs (mode, classes,
# per_class, limit would otherwise drop queries silently).
EVERY_QUERY = {"mode": "full", "classes": (), "per_class": None, "limit": None}


def similar(run_dir: str, queries: Sequence[str], k: int, space: str,
            make_config: Callable[[str, str], RunConfig]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """The k nearest training images of every query image (files, or folders searched for images) by the run's
    saved index, with the k-NN vote; and (query, reason) for each query image that could not be processed.

    The queries are copied into a source in the run's scratch folder (one class folder per query folder name), where
    executors reach them as they reached the run, and extracted there by `pipeline.transform` with the config
    `make_config(source, output)` gives, its selection replaced by EVERY_QUERY; the scratch folder is deleted
    afterwards.
    """
    import pandas as pd

    from fruitpipe.pipeline import transform

    if k < 1:
        raise FruitpipeError(f"k must be a positive integer, got {k}")
    folder = RunFolder.finished(run_dir)
    index = open_index(folder, space)
    table, column = _space(space)
    with folder.scratch() as work:
        source, output = f"{work}/queries", f"{work}/extracted"
        origin = _stage_queries(queries, source)
        result = transform(run_dir, dataclasses.replace(make_config(source, output), **EVERY_QUERY).validate())
        extracted = RunFolder.finished(result.output)
        failed = [(origin[row["path"]], row["reason"]) for row in extracted.table(ERRORS).to_pylist()]
        if result.images_ok == 0:
            return pd.DataFrame(columns=QUERY_COLUMNS), failed
        data = extracted.table(table, columns=["path", "label", column])
    distances, ids = index.search(sinks.vectors_matrix(data, column), k)
    train_paths = index.rows.column("path").to_pylist()
    train_labels = index.rows.column("label").to_pylist()
    records = []
    for staged, query_folder, row_distances, row_ids in zip(data.column("path").to_pylist(),
                                                            data.column("label").to_pylist(), distances, ids):
        found = [(int(i), float(d)) for i, d in zip(row_ids, row_distances) if i >= 0]
        winner, share = vote([train_labels[i] for i, _ in found])
        records.extend({"query": origin[staged], "query_folder": query_folder, "rank": rank, "path": train_paths[i],
                        "label": train_labels[i], "distance": distance, "vote_label": winner, "vote_share": share}
                       for rank, (i, distance) in enumerate(found, start=1))
    frame = pd.DataFrame.from_records(records, columns=QUERY_COLUMNS)
    return frame.sort_values(["query", "rank"], kind="stable", ignore_index=True), failed


def _stage_queries(queries: Sequence[str], source: str) -> dict[str, str]:
    """Copy every query image to `source`/<folder name>/NNNNNN-<name>; returns staged relative path -> query."""
    images: list[str] = []
    for query in queries:
        location = locate(query)
        if location.call("isfile", location.path):
            images.append(location.uri(location.path))
            continue
        if not location.call("isdir", location.path):
            raise FruitpipeError(f"query not found: {query}")
        found = sorted(path for path in find_files(location, location.path)
                       if path.lower().endswith(IMAGE_SUFFIXES) and not path.rsplit("/", 1)[-1].startswith("."))
        if not found:
            raise FruitpipeError(f"no images found at {query} (give image files or folders holding them)")
        images.extend(location.uri(path) for path in found)
    target = locate(source)
    origin = {}
    for number, image in enumerate(images):
        parent, name = (["", *image.rstrip("/").split("/")])[-2:]
        usable = parent and not parent.startswith(".") and ":" not in parent and parent not in SPLITS
        folder_name = parent if usable else "query"
        staged = f"{folder_name}/{number:06d}-{name}"
        location = locate(image)
        write_bytes(target, target.join(staged), read_bytes(location, location.path))
        origin[staged] = image
    return origin
