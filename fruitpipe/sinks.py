"""The run folder's layout and its writers: Parquet shards, CSV copies, JSON documents, all written whole.

Layout of OUT:
    features/part-NNNNN.parquet   image_id, path, label, label_index, split, features (list<float32>[D])
    pca/part-NNNNN.parquet        image_id, path, label, label_index, split, pca (list<float32>[k])
    metadata/part-NNNNN.parquet   image_id, path, label, split, width, height, bytes, format, status
    errors/part-NNNNN.parquet     image_id, path, label, stage, reason, retryable (every shard writes one)
    _shards/part-NNNNN.json       per-shard stats; its presence marks the shard done (resume)
    model/                        pca_model.npz + pca_model.json; the model artifact (feature_extractor.onnx + model.json)
    _fruitpipe_run.json           run marker: fingerprint, listing digest, state (in_progress / finished) and, while a
                                  run holds OUT, its lease (fruitpipe.run_folder)
    model_info/model_info.json, variance.csv, csv/*.csv, config.yaml, manifest.json (written last, withdrawn first)
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fruitpipe.storage import Location, list_names, read_bytes, read_tail, write_bytes

FEATURES = "features"
PCA = "pca"
METADATA = "metadata"
ERRORS = "errors"
SHARD_STATS = "_shards"
MODEL = "model"
MODEL_INFO = "model_info"
CSV = "csv"
RUN_MARKER = "_fruitpipe_run.json"
MANIFEST = "manifest.json"
VARIANCE_CSV = "variance.csv"
CONFIG_YAML = "config.yaml"
PCA_MODEL_NPZ = "pca_model.npz"
PCA_MODEL_JSON = "pca_model.json"
ONNX_FILE = "feature_extractor.onnx"
LISTING_ERRORS_PART = "part-listing.parquet"
PARQUET_MAGIC = b"PAR1"
# Enough for the footer of any part fruitpipe writes (a few KB), so counting rows is one small read.
_FOOTER_READ_BYTES = 64 * 1024

# Which image a row is about: the first columns of every table.
_IMAGE_FIELDS = [
    pa.field("image_id", pa.string()),
    pa.field("path", pa.string()),
    pa.field("label", pa.string()),
]
KEY_FIELDS = [*_IMAGE_FIELDS, pa.field("label_index", pa.int32()), pa.field("split", pa.string())]
METADATA_SCHEMA = pa.schema([
    *_IMAGE_FIELDS,
    pa.field("split", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bytes", pa.int64()),
    pa.field("format", pa.string()),
    pa.field("status", pa.string()),
])
ERRORS_SCHEMA = pa.schema([
    *_IMAGE_FIELDS,
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    # True when the failure says nothing about the image (a read that timed out): the next run retries it.
    pa.field("retryable", pa.bool_()),
])


def part_name(shard_id: int, suffix: str = ".parquet") -> str:
    return f"part-{shard_id:05d}{suffix}"


def vectors_schema(column: str) -> pa.Schema:
    """Key columns plus one fixed-length float32 vector column (stored as a Parquet list)."""
    return pa.schema([*KEY_FIELDS, pa.field(column, pa.list_(pa.float32()))])


def vectors_table(keys: pd.DataFrame, column: str, vectors: np.ndarray) -> pa.Table:
    """A table of key columns and a [N, D] float32 matrix as a list column, built without Python loops."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dimension = vectors.shape if vectors.ndim == 2 else (0, 0)
    offsets = pa.array(np.arange(count + 1, dtype=np.int32) * dimension)
    values = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))
    columns = [pa.array(keys[f.name].to_numpy(), type=f.type) for f in KEY_FIELDS]
    return pa.Table.from_arrays([*columns, values], schema=vectors_schema(column))


def vectors_matrix(table: pa.Table, column: str) -> np.ndarray:
    """The list column back as an [N, D] float32 matrix (zero-copy where Arrow allows)."""
    chunked = table.column(column).combine_chunks()
    if len(chunked) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    flat = chunked.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(chunked), -1).astype(np.float32, copy=False)


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", compression_level=1)
    return buffer.getvalue()


def write_parquet(out: Location, directory: str, name: str, table: pa.Table) -> None:
    write_bytes(out, out.join(directory, name), parquet_bytes(table))


def read_parquet(out: Location, directory: str, name: str) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(out, out.join(directory, name))))


def parquet_rows(out: Location, directory: str, name: str) -> int:
    """Row count from the Parquet footer alone: one ranged read of the file's end (a second for a huge footer).

    The footer is parsed behind a stand-in for the file's leading magic; a torn file raises ValueError or OSError.
    """
    path = out.join(directory, name)
    tail = read_tail(out, path, _FOOTER_READ_BYTES)
    if len(tail) < 12 or tail[-4:] != PARQUET_MAGIC:
        raise ValueError(f"{out.uri(path)} does not end like a Parquet file")
    footer_bytes = int.from_bytes(tail[-8:-4], "little") + 8
    if footer_bytes > len(tail):
        tail = read_tail(out, path, footer_bytes)
    return pq.read_metadata(pa.BufferReader(PARQUET_MAGIC + tail[-footer_bytes:])).num_rows


def read_dataset(out: Location, directory: str, columns: list[str] | None = None) -> pa.Table:
    """Every part of one output folder, concatenated in part order."""
    names = [name for name in list_names(out, out.join(directory)) if name.endswith(".parquet")]
    tables = [pq.read_table(io.BytesIO(read_bytes(out, out.join(directory, name))), columns=columns)
              for name in names]
    if not tables:
        raise FileNotFoundError(f"no Parquet parts in {out.uri(out.join(directory))}")
    return pa.concat_tables(tables, promote_options="default")


def write_json(out: Location, path: str, document: Any) -> None:
    write_bytes(out, out.join(path), (json.dumps(document, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(out: Location, path: str) -> Any:
    return json.loads(read_bytes(out, out.join(path)))


def write_csv(out: Location, path: str, table: pa.Table) -> None:
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    write_bytes(out, out.join(path), buffer.getvalue())


def expand_vectors(table: pa.Table, column: str, prefix: str) -> pa.Table:
    """Replace a list column by one numbered column per dimension, for CSV readers."""
    matrix = vectors_matrix(table, column)
    keys = table.drop_columns([column])
    expanded = {f"{prefix}{i}": matrix[:, i - 1] for i in range(1, matrix.shape[1] + 1)} if matrix.size else {}
    for name, values in expanded.items():
        keys = keys.append_column(name, pa.array(values, type=pa.float32()))
    return keys
