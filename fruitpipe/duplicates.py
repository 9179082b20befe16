"""Near-duplicates inside a run and test images leaked from its training images, judged on the pixels.

CNN features cannot tell a re-encoded copy from the next frame of a turning fruit: on demo data a JPEG re-encode
at quality 75 moves an image's PCA vector further (cosine distance up to 0.41) than distinct frames sit from
their nearest neighbour (median 0.018); docs/similarity.md has the figures. So images are compared by a pixel
fingerprint instead: grey levels at FINGERPRINT_SIDE px, blurred by BLUR_RADIUS px (JPEG noise is finer than
that); the distance of two images is the smallest cosine distance between the centre of one and the other shifted
by up to SHIFT_PX pixels either way, so a copy shifted by a pixel is as close as a re-encode. Candidates come from
a faiss index over CANDIDATE_SIDE px thumbnails (each image's CANDIDATES nearest); only they are compared.

Groups are the connected components of the pairs closer than the threshold; each member carries its distance to
its nearest other member, and a group holding more than one label is a likely label error. With a second run
(e.g. the Test split), every test image whose nearest training image is closer than the threshold is a leak. The
summary holds the whole nearest-neighbour distance histogram, so a user sees where the data sits against the
threshold, and the CNN's view beside it: the shares of images whose nearest training image is at least 0.99 and
0.995 similar in the run's PCA space (consecutive frames sit there, copies or not). The images are read again from
each run's source (its manifest names it): on the driver, or in tasks, a shard each, above TASKS_ABOVE_IMAGES.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from fruitpipe.config import RunConfig
from fruitpipe.errors import FruitpipeError
from fruitpipe.images import ImageDecodeError, decode_rgb
from fruitpipe.index import COSINE, NeighbourIndex, RunVectors, build, load_arrays, run_vectors, save_arrays
from fruitpipe.run_folder import DUPLICATES, FEATURES, Duplicates, RunFolder
from fruitpipe.storage import Location, locate, read_bytes

if TYPE_CHECKING:
    from fruitpipe.distributors import Distributor

FINGERPRINT_SIDE = 96
BLUR_RADIUS = 1.0
SHIFT_PX = 1
# The border left out of the compared centre: room for the shifts.
_BORDER = SHIFT_PX + 1
CANDIDATE_SIDE = 16
CANDIDATES = 8
# Measured on demo data (docs/similarity.md): re-encodes (JPEG quality 90/85/75, 4:4:4 or 4:2:0, a 1-pixel shift)
# reach at most 0.00084 from their original, distinct photos sit at least 0.0016 from their nearest neighbour;
# the default is about their geometric mean.
DEFAULT_THRESHOLD = 0.0012
# The CNN's view beside the pixels': the shares of images whose nearest training image has a PCA cosine similarity
# of at least these (consecutive frames, not copies; issue 12 quotes 54 % and 16 % of Fruits-360's Training images).
PCA_SIMILARITIES = (0.99, 0.995)
_HISTOGRAM_BELOW = 6
_CROSS_LABEL_SHOWN = 20
_READERS = 16
# Above this many images (the run's and the test run's together) the fingerprints are computed in tasks, one per
# shard (Spark for runs this large), each writing its shard's to the run's scratch folder; the driver only searches.
# On the driver a 100 px photo (Fruits-360's size) costs 0.24 CPU ms (decode, grey, resize, blur; measured on demo
# photos, loaded 2 cores), so 20,000 of them cost about what Spark's jobs cost to start (6-10 CPU seconds,
# fruitpipe.distributors); larger photos cost more per image (decoding grows with the pixels), S3 adds a round
# trip per image, and the driver holds only the fingerprints (9 KB an image) instead of reading every image.
TASKS_ABOVE_IMAGES = 20_000

GROUPS_SCHEMA = pa.schema([pa.field("group_id", pa.int32()), pa.field("image_id", pa.string()),
                           pa.field("path", pa.string()), pa.field("label", pa.string()),
                           pa.field("distance", pa.float32())])
LEAKS_SCHEMA = pa.schema([pa.field("test_image_id", pa.string()), pa.field("test_path", pa.string()),
                          pa.field("test_label", pa.string()), pa.field("train_image_id", pa.string()),
                          pa.field("train_path", pa.string()), pa.field("train_label", pa.string()),
                          pa.field("distance", pa.float32())])


def fingerprint(data: bytes) -> np.ndarray:
    """An image's pixel fingerprint: blurred grey levels, FINGERPRINT_SIDE px square, as uint8."""
    image, _ = decode_rgb(data)
    grey = image.convert("L").resize((FINGERPRINT_SIDE, FINGERPRINT_SIDE), Image.Resampling.BOX)
    return np.asarray(grey.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)), dtype=np.uint8)


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-6)


def aligned_distances(image: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Distance of one fingerprint to each of `others`: the smallest cosine distance between the centre of `image`
    and each other shifted by up to SHIFT_PX pixels."""
    side, edge = FINGERPRINT_SIDE, _BORDER
    centre = _unit(image[edge:side - edge, edge:side - edge].reshape(1, -1).astype(np.float32))[0]
    best = np.full(len(others), 2.0, dtype=np.float32)
    for dy in range(-SHIFT_PX, SHIFT_PX + 1):
        for dx in range(-SHIFT_PX, SHIFT_PX + 1):
            window = others[:, edge + dy:side - edge + dy, edge + dx:side - edge + dx]
            best = np.minimum(best, 1.0 - _unit(window.reshape(len(others), -1).astype(np.float32)) @ centre)
    return np.maximum(best, 0.0)


def _thumbnails(fingerprints: np.ndarray) -> np.ndarray:
    """CANDIDATE_SIDE px means of the fingerprints, flattened, centred and unit length: what the candidate index
    holds."""
    block = FINGERPRINT_SIDE // CANDIDATE_SIDE
    small = fingerprints.astype(np.float32).reshape(len(fingerprints), CANDIDATE_SIDE, block, CANDIDATE_SIDE, block)
    return _unit(small.mean(axis=(2, 4)).reshape(len(fingerprints), -1))


@dataclass(frozen=True)
class _Images:
    """A run's processed images (image_id, path, label) and their fingerprints, in the order of its tables."""

    rows: pa.Table
    fingerprints: np.ndarray


def _read_fingerprint(location: Location, source: str, output: str, path: str) -> np.ndarray:
    """The fingerprint of one of a run's images, read again from its source; a one-line error when it is gone."""
    try:
        return fingerprint(read_bytes(location, location.join(path)))
    except FileNotFoundError:
        raise FruitpipeError(f"{source}/{path} is gone: near-duplicates are judged on the pixels, so the source of "
                             f"{output} must still hold its images") from None
    except ImageDecodeError as exc:
        raise FruitpipeError(f"{source}/{path} no longer decodes ({exc}): the source changed since {output} was "
                             "made") from None


def _stacked(fingerprints: Sequence[np.ndarray]) -> np.ndarray:
    if not fingerprints:
        return np.zeros((0, FINGERPRINT_SIDE, FINGERPRINT_SIDE), dtype=np.uint8)
    return np.stack(fingerprints)


def _on_driver(folder: RunFolder) -> _Images:
    """A run's fingerprints read here, _READERS images at a time."""
    rows = folder.table(FEATURES, columns=["image_id", "path", "label"])
    source = folder.manifest()["source"]
    read = partial(_read_fingerprint, locate(source), source, folder.output)
    with ThreadPoolExecutor(max_workers=_READERS) as pool:
        return _Images(rows, _stacked(list(pool.map(read, rows.column("path").to_pylist()))))


def _in_tasks(folder: RunFolder, distributor: Distributor, work: str) -> _Images:
    """A run's fingerprints computed in tasks, a shard each, which write them to the scratch folder `work` (a
    folder of its own per run)."""
    rows = folder.table(FEATURES, columns=["image_id", "path", "label"])
    shards = sorted(folder.finished_shards())
    task = partial(_shard_fingerprints, output=folder.output, source=folder.manifest()["source"], work=work)
    image_ids: list[str] = []
    fingerprints: list[np.ndarray] = []
    for shard_id, (shard_ids, error) in zip(shards, distributor.map(task, shards)):
        if error is not None:
            raise FruitpipeError(error)
        if shard_ids:
            image_ids.extend(shard_ids)
            fingerprints.extend(load_arrays(work, _fingerprints_file(shard_id))["fingerprints"])
    if image_ids != rows.column("image_id").to_pylist():
        raise FruitpipeError(f"the features of {folder.output} changed while its images were fingerprinted; run "
                             "`fruitpipe duplicates` again")
    return _Images(rows, _stacked(fingerprints))


def _shard_fingerprints(shard_id: int, output: str, source: str, work: str) -> tuple[list[str], str | None]:
    """Task: fingerprint a shard's processed images and write them to `work`; returns their image ids, or the
    one-line error that stopped it."""
    folder = RunFolder(output)
    if not folder.shard_stats(shard_id).ok:
        return [], None
    part = folder.part(FEATURES, shard_id).select(["image_id", "path"])
    location = locate(source)
    try:
        fingerprints = [_read_fingerprint(location, source, output, path) for path in part.column("path").to_pylist()]
    except FruitpipeError as exc:
        return [], str(exc)
    save_arrays(work, _fingerprints_file(shard_id), fingerprints=_stacked(fingerprints))
    return part.column("image_id").to_pylist(), None


def _fingerprints_file(shard_id: int) -> str:
    return f"fingerprints-{shard_id:05d}.npz"


def _fingerprinted(folders: Sequence[RunFolder], config: RunConfig, scratch: RunFolder,
                   tasks_above_images: int) -> list[_Images]:
    """The images and fingerprints of each run: on the driver, or in tasks where `config` runs them when the runs
    hold more than `tasks_above_images` images."""
    from fruitpipe.distributors import choose_engine, open_distributor

    results = [folder.result() for folder in folders]
    images = sum(result.images_ok for result in results)
    if images <= tasks_above_images:
        return [_on_driver(folder) for folder in folders]
    shards = sum(result.shards_total for result in results)
    with scratch.scratch() as work, open_distributor(choose_engine(config, images), config, shards) as distributor:
        return [_in_tasks(folder, distributor, f"{work}/run-{number}") for number, folder in enumerate(folders)]


def find_duplicates(run_dir: str, config: RunConfig, test_run: str | None = None, threshold: float | None = None,
                    tasks_above_images: int = TASKS_ABOVE_IMAGES) -> Duplicates:
    """Find near-duplicate groups in RUN_DIR (and leaks from `test_run`), write RUN_DIR/duplicates/ and list it in
    the manifest. Above `tasks_above_images` images the fingerprints are computed in tasks where `config` (master,
    engine, Spark settings) runs them."""
    limit = DEFAULT_THRESHOLD if threshold is None else threshold
    if not limit > 0:
        raise FruitpipeError(f"--threshold must be a positive distance, got {limit}")
    folder = RunFolder.finished(run_dir)
    test = RunFolder.finished(test_run) if test_run is not None else None
    training, *tested = _fingerprinted([folder] + ([test] if test is not None else []), config, folder,
                                       tasks_above_images)
    candidates = build(RunVectors(training.rows, _thumbnails(training.fingerprints)), "fingerprint", COSINE)
    groups, group_summary = _groups(training, candidates, limit)
    summary: dict[str, Any] = {
        "measure": f"pixel fingerprint: grey {FINGERPRINT_SIDE} px, blur {BLUR_RADIUS} px, cosine distance, "
                   f"aligned within {SHIFT_PX} px", "threshold": limit, "threshold_is_default": threshold is None,
        "candidate_index": candidates.description["kind"], "images": training.rows.num_rows, **group_summary,
        "test_run": test_run, "pca_cosine_nearest": _pca_neighbours(folder, test)}
    leaks = None
    if test is not None:
        leaks, leak_summary = _leaks(training, candidates, tested[0], limit)
        summary.update(leak_summary)
    folder.withdraw_output(DUPLICATES)
    folder.write_duplicates(groups, leaks, summary)
    folder.list_outputs()
    return Duplicates(groups, leaks, summary)


def _pca_neighbours(folder: RunFolder, test: RunFolder | None) -> dict[str, dict[str, float] | None]:
    """Shares of training images (and of test images, when the test run used the same model) whose nearest
    training image in the run's PCA space is at least each of PCA_SIMILARITIES similar."""
    vectors = run_vectors(folder, "pca")
    index = build(vectors, "pca", COSINE)
    distances, ids = index.search(vectors.matrix, 2)
    own_first = ids[:, 0] == np.arange(len(ids))
    shares: dict[str, dict[str, float] | None] = {
        "training": _similar_shares(np.where(own_first, distances[:, 1], distances[:, 0]))}
    if test is not None:
        same_model = test.model_info().get("onnx_sha256") == folder.model_info().get("onnx_sha256")
        projected = folder.pca_model().transform(run_vectors(test, "features").matrix) if same_model else None
        shares["test"] = None if projected is None else _similar_shares(index.search(projected, 1)[0][:, 0])
    return shares


def _similar_shares(distances: np.ndarray) -> dict[str, float]:
    return {f"{level:g}": float(np.mean(1.0 - distances >= level)) for level in PCA_SIMILARITIES}


def _nearest(training: _Images, candidates: NeighbourIndex, queries: np.ndarray,
             own_ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Each query fingerprint's CANDIDATES candidate training ids (its own id left out) and aligned distances to
    them (inf where there is no candidate)."""
    _, ids = candidates.search(_thumbnails(queries), CANDIDATES + (own_ids is not None))
    if own_ids is not None:
        ids = np.where(ids == own_ids[:, None], -1, ids)
    distances = np.full(ids.shape, np.inf, dtype=np.float32)
    for row, (query, row_ids) in enumerate(zip(queries, ids)):
        valid = row_ids >= 0
        distances[row, valid] = aligned_distances(query, training.fingerprints[row_ids[valid]])
    return ids, distances


def _groups(training: _Images, candidates: NeighbourIndex, limit: float) -> tuple[pa.Table, dict[str, Any]]:
    """Connected components of the pairs closer than `limit`, and their summary with the NN-distance histogram."""
    count = training.rows.num_rows
    ids, distances = _nearest(training, candidates, training.fingerprints, np.arange(count))
    parent = np.arange(count)

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in zip(*np.nonzero(distances < limit)):
        ra, rb = root(int(a)), root(int(ids[a, b]))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(node) for node in range(count)])
    nearest = distances.min(axis=1) if count else np.zeros(0, dtype=np.float32)
    sizes = Counter(roots.tolist())
    grouped = sorted((int(roots[node]), float(nearest[node]), node) for node in range(count)
                     if sizes[roots[node]] > 1)
    group_ids = {group_root: number for number, group_root in enumerate(dict.fromkeys(r for r, _, _ in grouped))}
    rows = training.rows.take(pa.array([node for _, _, node in grouped], type=pa.int64()))
    table = pa.Table.from_arrays(
        [pa.array([group_ids[r] for r, _, _ in grouped], pa.int32()), rows.column("image_id"), rows.column("path"),
         rows.column("label"), pa.array([d for _, d, _ in grouped], pa.float32())], schema=GROUPS_SCHEMA)
    labels_of: dict[int, set[str]] = {}
    for group_id, label in zip(table.column("group_id").to_pylist(), table.column("label").to_pylist()):
        labels_of.setdefault(group_id, set()).add(label)
    cross = [{"group_id": g, "labels": sorted(labels)} for g, labels in labels_of.items() if len(labels) > 1]
    return table, {"groups": len(group_ids), "images_in_groups": table.num_rows,
                   "largest_group": max((sizes[r] for r in group_ids), default=0),
                   "cross_label_groups": len(cross), "cross_label_examples": cross[:_CROSS_LABEL_SHOWN],
                   "nn_distance_histogram": histogram(nearest[np.isfinite(nearest)], limit)}


def _leaks(training: _Images, candidates: NeighbourIndex, test: _Images,
           limit: float) -> tuple[pa.Table, dict[str, Any]]:
    """Every test image whose nearest training image is closer than `limit`, with the test side's histogram."""
    ids, distances = _nearest(training, candidates, test.fingerprints, None)
    best = np.argmin(distances, axis=1) if len(distances) else np.zeros(0, dtype=np.int64)
    nearest = distances[np.arange(len(best)), best]
    leaked = np.flatnonzero(nearest < limit)
    test_rows = test.rows.take(pa.array(leaked, type=pa.int64()))
    train_rows = training.rows.take(pa.array(ids[leaked, best[leaked]], type=pa.int64()))
    table = pa.Table.from_arrays(
        [test_rows.column("image_id"), test_rows.column("path"), test_rows.column("label"),
         train_rows.column("image_id"), train_rows.column("path"), train_rows.column("label"),
         pa.array(nearest[leaked], pa.float32())], schema=LEAKS_SCHEMA)
    per_class = Counter(test_rows.column("label").to_pylist())
    return table, {"test_images": test.rows.num_rows, "leaked_test_images": int(leaked.size),
                   "leaked_per_class": dict(sorted(per_class.items())),
                   "test_nn_distance_histogram": histogram(nearest[np.isfinite(nearest)], limit)}


def histogram(distances: np.ndarray, limit: float) -> list[dict[str, float]]:
    """Counts of `distances` in bins whose edges are `limit` times powers of two (0 first), up past the largest."""
    largest = float(np.max(distances)) if distances.size else limit
    edges = [0.0] + [limit * 2.0 ** power for power in range(-_HISTOGRAM_BELOW, 64)
                     if power <= 0 or limit * 2.0 ** (power - 1) <= largest]
    counts, _ = np.histogram(np.clip(distances, 0.0, edges[-1]), bins=edges)
    return [{"from": low, "to": high, "images": int(n)} for low, high, n in zip(edges, edges[1:], counts)]
