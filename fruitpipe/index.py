"""A nearest-neighbour index per run, and `similar`: the run's training images nearest to new photos.

The index (faiss) holds a finished run's PCA vectors (`space="pca"`, default) or its raw
features (`space="features"`). Cosine distance (1 - cosine similarity, on vectors centred on the training mean: the
PCA rows already are, raw features are centred with the PCA's mean, so it is `evaluate`'s metric) is the default;
`metric="l2"` gives Euclidean distance. Below EXACT_BELOW vectors the index is exact (flat); above it an IVF index
(trained on a sample of the vectors) whose nprobe is raised until recall@10 against exact search, measured on
RECALL_QUERIES of the indexed vectors (each query's own id left out), reaches RECALL_GOAL; the recall found is
stored with the index. The sample and the queries are the rows whose image ids hash smallest, so an index built in
tasks (above TASKS_ABOVE_BYTES of vectors: each shard's vectors read, assigned to their lists and searched for the
queries' exact neighbours in a task, the lists trained and the shards merged on the driver) is the index the driver
builds from the same rows. A query goes through `pipeline.transform` (the run's own model and PCA), so a photo is
compared exactly as the run's images were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from fruitpipe import sinks
from fruitpipe.config import SPLITS, RunConfig
from fruitpipe.dataset import IMAGE_SUFFIXES
from fruitpipe.errors import FruitpipeError
from fruitpipe.run_folder import ERRORS, FEATURES, INDEX, PCA, RunFolder, StoredIndex
from fruitpipe.storage import find_files, locate, read_bytes, write_bytes

if TYPE_CHECKING:
    from fruitpipe.distributors import Distributor

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
# Above this many bytes of vectors (count x dim x 4) `build_index` reads, prepares, assigns and searches them in
# tasks (Spark, for a run this large), shard by shard, and the driver holds them once, in the merged index. Built on
# the driver they are held about four times (the Arrow table, the prepared copy, the exact index, the IVF index), a
# GB of driver memory at this size, and read and assigned on one core. 256 MB is 1.3 million PCA-50 vectors or
# 52,000 raw 1280-d features (Fruits-360 FULL's 67,000 features are 343 MB; its PCA-50 vectors 13 MB).
TASKS_ABOVE_BYTES = 256 * 2**20
_SEED = 0
_KEY_COLUMNS = ["image_id", "path", "label"]


def _faiss() -> Any:
    """faiss (a base dependency: executors build a large run's index), imported where an index is used."""
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
        plan = _IvfPlan.of(vectors.rows)
        index = _trained(faiss, data[plan.sample_ids], plan.lists, faiss_metric)
        index.add(data)
        queries = data[plan.query_ids]
        tuning = plan.tuned(index, queries, flat.search(queries, RECALL_K + 1)[1])
    description.update(tuning, build_seconds=round(time.perf_counter() - started, 3))
    return NeighbourIndex(index, vectors.rows, description, centre)


def sample_keys(image_ids: Sequence[str]) -> np.ndarray:
    """A pseudo-random 64-bit key per image id. The IVF training sample and the recall queries are the rows with the
    smallest keys, so the driver and tasks that each see only some rows choose the same ones."""
    return np.array([int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "big")
                     for image_id in image_ids], dtype=np.uint64)


@dataclass(frozen=True)
class _IvfPlan:
    """An IVF index's lists (about sqrt(N)), its training sample (up to TRAIN_PER_LIST vectors per list) and its
    recall queries (the first RECALL_QUERIES of the sample): row ids in the order of their sample keys; `cutoff` is
    the largest sample key in the sample."""

    lists: int
    sample_ids: np.ndarray
    query_ids: np.ndarray
    cutoff: int

    @classmethod
    def of(cls, rows: pa.Table) -> _IvfPlan:
        count = rows.num_rows
        lists = max(16, int(np.sqrt(count)))
        keys = sample_keys(rows.column("image_id").to_pylist())
        order = np.argsort(keys, kind="stable")
        sample_ids = order[:min(count, lists * TRAIN_PER_LIST)]
        return cls(lists, sample_ids, order[:min(count, RECALL_QUERIES)], int(keys[sample_ids[-1]]))

    def tuned(self, index: Any, queries: np.ndarray, exact_ids: np.ndarray) -> dict[str, Any]:
        """Set the smallest power-of-two nprobe whose recall@10 on the queries against their exact neighbours
        (`exact_ids`, RECALL_K + 1 a query, its own id among them) reaches RECALL_GOAL; returns the description."""
        exact = _without_self(exact_ids, self.query_ids)
        nprobe, recall = 1, 0.0
        while True:
            index.nprobe = nprobe
            recall = recall_at(_without_self(index.search(queries, RECALL_K + 1)[1], self.query_ids), exact)
            if recall >= RECALL_GOAL or nprobe >= self.lists:
                break
            nprobe = min(self.lists, nprobe * 2)
        return {"kind": IVF, "lists": self.lists, "nprobe": nprobe, "trained_on": int(self.sample_ids.size),
                "recall_at_10": round(recall, 4), "recall_queries": int(self.query_ids.size)}


def _trained(faiss: Any, sample: np.ndarray, lists: int, faiss_metric: int) -> Any:
    """An empty IVF-flat index whose lists are trained (k-means, seeded) on `sample`."""
    dim = sample.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlat(dim, faiss_metric), dim, lists, faiss_metric)
    index.cp.seed = _SEED
    index.train(sample)
    return index


def _without_self(ids: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    """The first RECALL_K ids of each row that are not the query itself."""
    return np.array([[i for i in row if i != own][:RECALL_K] for row, own in zip(ids.tolist(), query_ids.tolist())])


def recall_at(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact neighbours that `found` holds (recall@k for k = the row length)."""
    hits = sum(len(set(f) & set(e)) for f, e in zip(found.tolist(), exact.tolist()))
    return hits / max(1, exact.size)


def build_index(run_dir: str, config: RunConfig, space: str = "pca", metric: str = COSINE,
                exact_below: int = EXACT_BELOW, tasks_above_bytes: int = TASKS_ABOVE_BYTES) -> dict[str, Any]:
    """Build the index of a finished run's `space` and save it under RUN_DIR/index/ (listed in the manifest);
    returns its description. Above `tasks_above_bytes` of vectors it is built in tasks where `config` (master,
    engine, Spark settings) runs them."""
    from fruitpipe.distributors import choose_engine, open_distributor

    _space(space)
    _check_metric(metric)
    folder = RunFolder.finished(run_dir)
    centre = space_centre(folder, space)
    result = folder.result()
    dim = result.pca_k if space == "pca" else result.feature_dim
    if result.images_ok * dim * 4 > tasks_above_bytes:
        with open_distributor(choose_engine(config, result.images_ok), config, result.shards_total) as distributor:
            built = build_in_tasks(folder, distributor, space, metric, centre, exact_below)
    else:
        built = build(run_vectors(folder, space), space, metric, centre, exact_below)
    faiss = _faiss()
    folder.withdraw_output(INDEX)
    folder.write_index(space, faiss.serialize_index(built.index).tobytes(), built.rows, built.description)
    folder.list_outputs()
    return built.description


def build_in_tasks(folder: RunFolder, distributor: Distributor, space: str, metric: str = COSINE,
                   centre: np.ndarray | None = None, exact_below: int = EXACT_BELOW) -> NeighbourIndex:
    """`build`'s index over a finished run's vectors of `space` (the same training sample and recall queries), with
    the vectors read, prepared, assigned to their lists and searched exactly in tasks, one per shard: the driver
    reads only the rows' keys, trains the lists on the sample the tasks return and adds each shard's vectors from
    the file its task wrote in the run's scratch folder, so it holds them once."""
    _check_metric(metric)
    faiss = _faiss()
    started = time.perf_counter()
    table, column = _space(space)
    rows = folder.table(table, columns=_KEY_COLUMNS)
    count = rows.num_rows
    if count < 2:
        raise FruitpipeError(f"an index needs at least 2 vectors; the run holds {count}")
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == COSINE else faiss.METRIC_L2
    shards = sorted(folder.finished_shards())
    reading = {"output": folder.output, "table": table, "column": column, "metric": metric, "centre": centre}
    plan = _IvfPlan.of(rows) if count >= exact_below else None
    trained, queries = None, None
    if plan is not None:
        sampled = distributor.map(partial(_sampled_rows, cutoff=plan.cutoff, **reading), shards)
        by_row, offset = {}, 0
        for shard_count, positions, vectors in sampled:
            by_row.update(zip((offset + positions).tolist(), vectors))
            offset += shard_count
        sample = np.stack([by_row[row] for row in plan.sample_ids.tolist()])
        trained = _trained(faiss, sample, plan.lists, faiss_metric)
        queries = sample[:plan.query_ids.size]
    index: Any = trained
    exact = _ExactNeighbours(metric, len(queries)) if queries is not None else None
    shipped = None if trained is None else faiss.serialize_index(trained)
    with folder.scratch() as work, distributor.shared((shipped, queries)) as model:
        task = partial(_added_rows, work=work, model=model, **reading)
        image_ids, offset = [], 0
        for shard_id, shard_ids in zip(shards, distributor.map(task, shards)):
            arrays = load_arrays(work, _shard_file(shard_id))
            vectors = np.ascontiguousarray(arrays["vectors"], dtype=np.float32)
            if exact is None and len(vectors):
                if index is None:
                    index = faiss.IndexFlat(vectors.shape[1], faiss_metric)
                index.add(vectors)
            elif len(vectors):
                ids = np.arange(offset, offset + len(vectors), dtype=np.int64)
                lists = np.ascontiguousarray(arrays["lists"], dtype=np.int64)
                index.add_core(len(vectors), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
                exact.merge(arrays["scores"], arrays["neighbours"] + offset)
            image_ids.extend(shard_ids)
            offset += len(shard_ids)
    if image_ids != rows.column("image_id").to_pylist():
        raise FruitpipeError(f"the {table} parts of {folder.output} changed while its index was built; build it again")
    description: dict[str, Any] = {"space": space, "metric": metric, "count": count, "dim": index.d,
                                   "faiss": faiss.__version__}
    if exact is None:
        description.update(kind=FLAT, recall_at_10=1.0)
    else:
        description.update(plan.tuned(index, queries, exact.ids))
    description.update(built_in=distributor.engine, build_seconds=round(time.perf_counter() - started, 3))
    return NeighbourIndex(index, rows, description, centre)


def _shard_vectors(shard_id: int, output: str, table: str, column: str, metric: str,
                   centre: np.ndarray | None) -> tuple[list[str], np.ndarray]:
    """A shard's image ids and prepared vectors (none for a shard without a processed image)."""
    folder = RunFolder(output)
    if not folder.shard_stats(shard_id).ok:
        return [], np.zeros((0, 0), dtype=np.float32)
    part = folder.part(table, shard_id)
    return part.column("image_id").to_pylist(), prepared(sinks.vectors_matrix(part, column), metric, centre)


def _sampled_rows(shard_id: int, cutoff: int, **reading: Any) -> tuple[int, np.ndarray, np.ndarray]:
    """Task: a shard's row count, and the positions and prepared vectors of its rows with sample keys up to
    `cutoff`."""
    image_ids, vectors = _shard_vectors(shard_id, **reading)
    positions = np.flatnonzero(sample_keys(image_ids) <= cutoff)
    return len(image_ids), positions, vectors[positions]


def _added_rows(shard_id: int, work: str, model: Callable[[], tuple[Any, np.ndarray | None]],
                **reading: Any) -> list[str]:
    """Task: write a shard's prepared vectors to the scratch folder `work`, with (for IVF) the list of each and the
    exact neighbours of the recall queries among them; returns its image ids."""
    image_ids, vectors = _shard_vectors(shard_id, **reading)
    shipped, queries = model()
    arrays = {"vectors": vectors}
    if shipped is not None and len(vectors):
        faiss = _faiss()
        trained = faiss.deserialize_index(shipped)  # owns the quantizer: kept while it is used
        quantizer = faiss.downcast_index(trained.quantizer)
        arrays["lists"] = quantizer.search(vectors, 1)[1][:, 0]
        flat = faiss.IndexFlat(vectors.shape[1], quantizer.metric_type)
        flat.add(vectors)
        arrays["scores"], arrays["neighbours"] = flat.search(queries, min(RECALL_K + 1, len(vectors)))
    save_arrays(work, _shard_file(shard_id), **arrays)
    return image_ids


def _shard_file(shard_id: int) -> str:
    return f"shard-{shard_id:05d}.npz"


class _ExactNeighbours:
    """The RECALL_K + 1 exact nearest rows of each recall query, merged shard by shard (ties to the lower id, as a
    flat search over every row would order them)."""

    def __init__(self, metric: str, queries: int) -> None:
        self.descending = metric == COSINE
        self.scores = np.zeros((queries, 0), dtype=np.float32)
        self.ids = np.zeros((queries, 0), dtype=np.int64)

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        scores, ids = np.hstack([self.scores, scores]), np.hstack([self.ids, ids])
        order = np.lexsort((ids, -scores if self.descending else scores), axis=-1)[:, :RECALL_K + 1]
        self.scores, self.ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def save_arrays(folder: str, name: str, **arrays: np.ndarray) -> None:
    """Write named arrays as one .npz file `name` under `folder` (a local path or URI): how a task hands the driver
    more than a task result should carry."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    location = locate(folder)
    write_bytes(location, location.join(name), buffer.getvalue())


def load_arrays(folder: str, name: str) -> dict[str, np.ndarray]:
    """The arrays `save_arrays` wrote."""
    location = locate(folder)
    with np.load(io.BytesIO(read_bytes(location, location.join(name)))) as arrays:
        return {key: arrays[key] for key in arrays.files}


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
