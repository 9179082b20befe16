"""How fruitpipe's files are encoded: the tables' Arrow schemas, Parquet parts, CSV copies and JSON documents,
each written whole through fruitpipe.storage (a merged CSV copy streamed there from its parts, one part at a time).

Where each file goes is the run folder's business (`fruitpipe.run_folder` names every path of the layout); this
module only turns tables and documents into bytes and back, given a Location and a path relative to it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fruitpipe.storage import Location, list_names, read_bytes, read_tail, with_retries, write_bytes, write_chunks

PARQUET_SUFFIX = ".parquet"
CSV_SUFFIX = ".csv"
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


def vectors_schema(column: str) -> pa.Schema:
    """Key columns plus one fixed-length float32 vector column (stored as a Parquet list)."""
    return pa.schema([*KEY_FIELDS, pa.field(column, pa.list_(pa.float32()))])


def vectors_table(keys: pa.Table, column: str, vectors: np.ndarray) -> pa.Table:
    """The key columns of `keys` and a [N, D] float32 matrix as a list column, built without Python loops."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dimension = vectors.shape if vectors.ndim == 2 else (0, 0)
    offsets = pa.array(np.arange(count + 1, dtype=np.int32) * dimension)
    values = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1)))
    columns = [keys.column(f.name).cast(f.type) for f in KEY_FIELDS]
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


def write_parquet(out: Location, path: str, table: pa.Table, group_by: str | None = None) -> None:
    """A table as one Parquet object; with `group_by` (the table sorted by that column), one row group per value,
    so `read_parquet_where` reads one value's rows without the rest."""
    if group_by is None:
        write_bytes(out, out.join(path), parquet_bytes(table))
        return
    buffer = io.BytesIO()
    values = table.column(group_by).to_numpy()
    starts = [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist(), len(values)]
    with pq.ParquetWriter(buffer, table.schema, compression="zstd", compression_level=1) as writer:
        for start, end in zip(starts, starts[1:]):
            writer.write_table(table.slice(start, end - start))
    write_bytes(out, out.join(path), buffer.getvalue())


def read_parquet(out: Location, path: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(out, out.join(path))), columns=columns)


def read_parquet_where(out: Location, path: str, column: str, value: Any) -> pa.Table:
    """The rows whose `column` equals `value`, reading only the row groups that can hold them (ranged reads of a
    file written with `write_parquet(group_by=column)`)."""
    def read() -> pa.Table:
        with out.fs.open(out.join(path), "rb") as handle:
            return pq.read_table(handle, filters=[(column, "=", value)])
    return with_retries(read, out.uri(out.join(path)))


def parquet_rows(out: Location, path: str) -> int:
    """Row count from the Parquet footer alone: one ranged read of the file's end (a second for a huge footer).

    The footer is parsed behind a stand-in for the file's leading magic; a torn file raises ValueError or OSError.
    """
    path = out.join(path)
    tail = read_tail(out, path, _FOOTER_READ_BYTES)
    if len(tail) < 12 or tail[-4:] != PARQUET_MAGIC:
        raise ValueError(f"{out.uri(path)} does not end like a Parquet file")
    footer_bytes = int.from_bytes(tail[-8:-4], "little") + 8
    if footer_bytes > len(tail):
        tail = read_tail(out, path, footer_bytes)
    return pq.read_metadata(pa.BufferReader(PARQUET_MAGIC + tail[-footer_bytes:])).num_rows


def read_dataset(out: Location, directory: str, columns: list[str] | None = None, every: int = 1) -> pa.Table:
    """Every Parquet file of one folder (or every `every`-th, from the first), concatenated in name order."""
    names = [name for name in list_names(out, out.join(directory)) if name.endswith(PARQUET_SUFFIX)][::every]
    tables = [read_parquet(out, f"{directory}/{name}", columns) for name in names]
    if not tables:
        raise FileNotFoundError(f"no Parquet parts in {out.uri(out.join(directory))}")
    return pa.concat_tables(tables, promote_options="default")


def write_json(out: Location, path: str, document: Any) -> None:
    write_bytes(out, out.join(path), (json.dumps(document, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(out: Location, path: str) -> Any:
    return json.loads(read_bytes(out, out.join(path)))


def csv_bytes(table: pa.Table) -> bytes:
    """The table as CSV: a header line, then one line per row."""
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer)
    return buffer.getvalue()


def write_csv(out: Location, path: str, table: pa.Table) -> None:
    write_bytes(out, out.join(path), csv_bytes(table))


def write_merged_csv(out: Location, path: str, parts: list[str], empty: pa.Table) -> None:
    """One CSV file from CSV parts of one table (paths relative to `out`, in row order), streamed: one part in
    memory at a time, the first part's header kept and every later part's dropped, so the file is byte for byte
    the CSV of the parts' rows concatenated. `empty` (no rows) gives the header when there is no part."""
    def chunks() -> Iterator[bytes | memoryview]:
        if not parts:
            yield csv_bytes(empty)
        for number, part in enumerate(parts):
            data = read_bytes(out, out.join(part))
            yield data if number == 0 else memoryview(data)[data.index(b"\n") + 1:]
    write_chunks(out, out.join(path), chunks)


def expand_vectors(table: pa.Table, column: str, prefix: str) -> pa.Table:
    """Replace a list column by one numbered column per dimension, for CSV readers."""
    matrix = vectors_matrix(table, column)
    keys = table.drop_columns([column])
    expanded = {f"{prefix}{i}": matrix[:, i - 1] for i in range(1, matrix.shape[1] + 1)} if matrix.size else {}
    for name, values in expanded.items():
        keys = keys.append_column(name, pa.array(values, type=pa.float32()))
    return keys
