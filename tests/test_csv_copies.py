"""CSV copies without a driver funnel: each shard's projection task writes its CSV parts, the driver streams them
into one file per table for a small run (byte for byte what writing the whole table gives), a large run keeps the
parts, and the manifest's row counts come from the shards' stats, equal to the Parquet footers."""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from fruitpipe import config as config_module
from fruitpipe import sinks, stages
from fruitpipe.config import build_config
from fruitpipe.distributors import DriverDistributor
from fruitpipe.pca import GramStatistics, fit
from fruitpipe.pipeline import run
from fruitpipe.records import ShardStats
from fruitpipe.run_folder import CSV_COPIES, ERRORS, FEATURES, METADATA, PCA, RunFolder, ShardTables, csv_tables
from fruitpipe.storage import locate
from tests.support.s3 import create_bucket, object_keys, read_object

ALL_TABLES = csv_tables(features_csv=True)
_SPREAD = {PCA: ("pca", "pc"), FEATURES: ("features", "f")}
# Strings a CSV writer must quote or escape, so a header found by the wrong newline would show.
AWKWARD = 'Äpfel "rot", grün\nzweite Zeile'


def _whole_table_csv(folder: RunFolder, name: str) -> bytes:
    """What the CSV copy of a table was before it was written in parts: the whole table at once."""
    table = folder.table(name)
    return sinks.csv_bytes(sinks.expand_vectors(table, *_SPREAD[name]) if name in _SPREAD else table)


def _keys(shard_id: int, count: int) -> list[dict]:
    return [{"image_id": f"id-{shard_id}-{n}", "path": f"Training/{AWKWARD}/{shard_id}-{n}.jpg", "label": AWKWARD,
             "label_index": 0, "split": "Training"} for n in range(count)]


def _write_shard(folder: RunFolder, shard_id: int, ok: int, failed: int, rng: np.random.Generator) -> ShardStats:
    good, bad = _keys(shard_id, ok + failed)[:ok], _keys(shard_id, ok + failed)[ok:]
    features = sinks.vectors_table(pa.Table.from_pylist(good, schema=pa.schema(sinks.KEY_FIELDS)), "features",
                                   rng.normal(size=(ok, 6)).astype(np.float32))
    metadata = pa.Table.from_pylist([{**row, "width": 100, "height": 80, "bytes": 1234, "format": "JPEG",
                                      "status": "ok" if row in good else "failed"} for row in good + bad],
                                    schema=sinks.METADATA_SCHEMA)
    errors = pa.Table.from_pylist([{**row, "stage": "decode", "reason": f"truncated, \"{AWKWARD}\"",
                                    "retryable": False} for row in bad], schema=sinks.ERRORS_SCHEMA)
    stats = ShardStats(shard_id=shard_id, images=ok + failed, ok=ok, failed=failed, feature_dim=6, images_sha256="")
    return folder.write_shard(shard_id, ShardTables(features, metadata, errors), lambda: stats)


@pytest.fixture
def projected(tmp_path) -> tuple[RunFolder, list[ShardStats]]:
    """A run folder of three shards (the middle one with no image processed) and one listing error, projected by
    the stage's own tasks (in this process), CSV parts of every table written."""
    folder = RunFolder(str(tmp_path / "run"))
    rng = np.random.default_rng(0)
    stats = [_write_shard(folder, 0, ok=5, failed=1, rng=rng), _write_shard(folder, 1, ok=0, failed=3, rng=rng),
             _write_shard(folder, 2, ok=4, failed=0, rng=rng)]
    folder.write_listing_errors(pa.Table.from_pylist(
        [{"image_id": "", "path": "Training/notes.txt", "label": "", "stage": "list", "reason": "not an image file",
          "retryable": False}], schema=sinks.ERRORS_SCHEMA))
    statistics = GramStatistics.empty(np.zeros(0))
    for shard_id in (0, 2):
        statistics.merge(folder.shard_gram(shard_id))
    projected_rows = stages.run_projection(DriverDistributor(), folder.output, [0, 1, 2], fit(statistics, k=3),
                                           ALL_TABLES)
    assert projected_rows == 9
    return folder, stats


def test_merged_csv_copies_are_byte_identical_to_the_whole_tables(projected):
    folder, _ = projected
    out = Path(folder.output)
    before = {name: _whole_table_csv(folder, name) for name in ALL_TABLES}
    assert folder.write_csv_copies(ALL_TABLES, merge=True) == [CSV_COPIES[name] for name in ALL_TABLES]
    for name in ALL_TABLES:
        assert (out / CSV_COPIES[name]).read_bytes() == before[name], name
    assert sorted(path.name for path in (out / "csv").iterdir()) == sorted(Path(CSV_COPIES[n]).name for n in ALL_TABLES)
    listing_error_last = (out / CSV_COPIES[ERRORS]).read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    assert listing_error_last.startswith(b'"","Training/notes.txt"')


def test_a_large_run_keeps_one_part_per_shard_and_table(projected):
    folder, _ = projected
    out = Path(folder.output)
    assert folder.write_csv_copies(ALL_TABLES, merge=False) == [f"csv/{name}/" for name in ALL_TABLES]
    parts = {name: sorted(path.name for path in (out / "csv" / name).iterdir()) for name in ALL_TABLES}
    assert parts[PCA] == parts[FEATURES] == ["part-00000.csv", "part-00002.csv"]  # shard 1 has no features
    assert parts[METADATA] == ["part-00000.csv", "part-00001.csv", "part-00002.csv"]
    assert parts[ERRORS] == ["part-00000.csv", "part-00001.csv", "part-00002.csv", "part-listing.csv"]
    assert not any(path.is_file() for path in (out / "csv").iterdir())
    for name in ALL_TABLES:  # each part holds its own header: the parts read back are the table
        chunks = [(out / "csv" / name / part).read_bytes() for part in parts[name]]
        joined = chunks[0] + b"".join(chunk.split(b"\n", 1)[1] for chunk in chunks[1:])
        assert joined == _whole_table_csv(folder, name), name


def test_an_empty_table_gets_its_header_alone(tmp_path):
    folder = RunFolder(str(tmp_path / "run"))
    _write_shard(folder, 0, ok=3, failed=0, rng=np.random.default_rng(1))
    folder.write_listing_errors(sinks.ERRORS_SCHEMA.empty_table())
    stages.run_projection(DriverDistributor(), folder.output, [0], fit(folder.shard_gram(0), k=2), ALL_TABLES)
    folder.write_csv_copies(ALL_TABLES, merge=True)
    errors_csv = (tmp_path / "run" / CSV_COPIES[ERRORS]).read_bytes()
    assert errors_csv == _whole_table_csv(folder, ERRORS) == b'"image_id","path","label","stage","reason","retryable"\n'


def test_merging_holds_one_part_in_memory_not_the_table(tmp_path):
    """Twenty 1 MB parts merge with a peak of about one part, not the 20 MB file."""
    out = locate(str(tmp_path))
    header = b'"image_id","path"\n'
    part_bytes = header + b"".join(b'"%07d","%s"\n' % (row, b"x" * 90) for row in range(10_000))
    for number in range(20):
        (tmp_path / "parts").mkdir(exist_ok=True)
        (tmp_path / "parts" / f"part-{number:05d}.csv").write_bytes(part_bytes)
    parts = [f"parts/part-{number:05d}.csv" for number in range(20)]
    tracemalloc.start()
    try:
        sinks.write_merged_csv(out, "merged.csv", parts, pa.table({"image_id": pa.array([], pa.string())}))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    merged = (tmp_path / "merged.csv").read_bytes()
    assert merged == part_bytes + (part_bytes[len(header):]) * 19
    assert peak < 3 * len(part_bytes) < len(merged) / 5


@pytest.mark.s3
def test_on_s3_the_merge_is_one_upload_and_a_failed_one_leaves_no_object(moto, s3_process_env):
    client = create_bucket(moto, "fruitpipe-csv")
    header = b'"image_id","reason"\n'
    parts = [header + b'"%d","ok, \"%d\""\n' % (number, number) * 3 for number in range(3)]
    for number, data in enumerate(parts):
        client.put_object(Bucket="fruitpipe-csv", Key=f"run/csv/errors/part-{number:05d}.csv", Body=data)
    out = locate("s3://fruitpipe-csv/run")
    names = [f"csv/errors/part-{number:05d}.csv" for number in range(3)]
    sinks.write_merged_csv(out, "csv/errors.csv", names, sinks.ERRORS_SCHEMA.empty_table())
    merged = read_object(client, "fruitpipe-csv", "run/csv/errors.csv")
    assert merged == parts[0] + b"".join(part[len(header):] for part in parts[1:])

    with pytest.raises(FileNotFoundError):  # the second part is gone: the merge stops after the first
        sinks.write_merged_csv(out, "csv/torn.csv", [names[0], "csv/errors/part-99999.csv"], pa.table({}))
    assert object_keys(client, "fruitpipe-csv", "run/csv") == [f"run/{name}" for name in ["csv/errors.csv", *names]]


def test_manifest_counts_from_shard_stats_equal_the_parquet_footers(projected):
    folder, stats = projected
    assert RunFolder.outputs_of(stats, listing_errors=1) == folder.outputs()
    assert folder.outputs()[ERRORS] == {"format": "parquet", "parts": 4, "rows": 5}


# -- a whole run, on the local engine: failed images, a listing error, the two CSV forms -------------------------

@pytest.fixture(scope="module")
def bad_source(demo_root, tmp_path_factory) -> Path:
    """Training/Aaa (4 truncated JPEGs: a shard with no features at shard size 4) and Good (6 photos, then a
    truncated file, and a notes file the listing refuses): 3 shards of 4, 4 and 3 images."""
    source = tmp_path_factory.mktemp("csv-source")
    photos = sorted((demo_root / "Training").glob("*/*.jpg"))[:6]
    for folder in ("Aaa", "Good"):
        (source / "Training" / folder).mkdir(parents=True)
    for number in range(4):
        (source / "Training" / "Aaa" / f"broken-{number}.jpg").write_bytes(photos[0].read_bytes()[:300])
    for photo in photos:
        shutil.copy(photo, source / "Training" / "Good" / photo.name)
    (source / "Training" / "Good" / "zz-broken.jpg").write_bytes(photos[1].read_bytes()[:300])
    (source / "Training" / "Good" / "notes.txt").write_text("not a photo\n")
    return source


def test_a_run_streams_its_csv_copies_and_counts_from_stats(bad_source, cache_dir, tmp_path, monkeypatch):
    options = {"source": str(bad_source), "output": str(tmp_path / "run"), "engine": "local", "image_size": 96,
               "pca_k": 3, "shard_size": 4, "features_csv": True, "cache_dir": cache_dir, "quiet": True}
    result = run(build_config({}, options))
    folder = RunFolder.finished(result.output)
    manifest = folder.manifest()
    assert (result.images_ok, result.images_failed, result.shards_total) == (6, 6, 3)  # 5 broken + notes.txt
    assert manifest["outputs"] == folder.outputs()
    assert folder.outputs()[ERRORS] == {"format": "parquet", "parts": 4, "rows": 6}
    assert folder.outputs()[PCA] == {"format": "parquet", "parts": 2, "rows": 6}
    assert [doc for doc in manifest["documents"] if doc.startswith("csv/")] == [CSV_COPIES[n] for n in ALL_TABLES]
    for name in ALL_TABLES:
        assert (Path(result.output) / CSV_COPIES[name]).read_bytes() == _whole_table_csv(folder, name), name
    assert not (Path(result.output) / "csv" / PCA).exists()

    monkeypatch.setattr(config_module, "CSV_SINGLE_FILE_MAX_IMAGES", result.images_listed - 1)
    again = run(build_config({}, options))
    assert again.shards_resumed == again.shards_total
    documents = json.loads((Path(result.output) / "manifest.json").read_text())["documents"]
    assert [doc for doc in documents if doc.startswith("csv/")] == [f"csv/{name}/" for name in ALL_TABLES]
    assert not (Path(result.output) / CSV_COPIES[PCA]).exists()
    assert len(list((Path(result.output) / "csv" / METADATA).glob("part-*.csv"))) == 3

    run(build_config({}, {**options, "csv_merged": True}))
    for name in ALL_TABLES:
        assert (Path(result.output) / CSV_COPIES[name]).read_bytes() == _whole_table_csv(folder, name), name
