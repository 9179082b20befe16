"""The run folder's one owner: its layout, who may write it, and whether what it holds is a finished run.

Shaped like Ray Data's Datasink contract. On the driver `RunFolder.claim` takes the folder (start),
tasks ask `resume_shard` what a resume may skip, and `commit` writes the manifest last (complete); leaving the
context without a commit (failed) releases the lease and leaves the folder marked in progress for the next run.
On executors `write_shard` writes a shard's parts whole, then its stats file: the shard's commit record. Readers
open a finished folder with `RunFolder.finished` and read typed things (`result`, `pca_model`, `artifact`,
`table`). Every path of the layout is named here and nowhere else:

    features/part-NNNNN.parquet   image_id, path, label, label_index, split, features (list<float32>[D])
    pca/part-NNNNN.parquet        image_id, path, label, label_index, split, pca (list<float32>[k])
    metadata/part-NNNNN.parquet   image_id, path, label, split, width, height, bytes, format, status
    errors/part-NNNNN.parquet     image_id, path, label, stage, reason, retryable (every shard writes one;
                                  part-listing.parquet holds the files the listing could not take as images)
    _shards/part-NNNNN.json       per-shard stats (`records.ShardStats`); written last, it marks the shard done
    _gram/generation-NNNNN-<digest>.npz   the PCA sufficient statistics (`pca.GramStatistics.to_bytes`) of one
                                  generation's shards, for the shards (and their images) the digest names: a
                                  refit reads only the features of generations that are new or lost images
    _plan/rows-<id>/part-NNNNN.parquet   the shard plan (`records.ShardPlan`), one part per class folder, written
                                  by tasks: image_id, path, label, label_index, split, bytes, version, shard_id,
                                  generation; `_plan/plan.json` (written after its parts, it names them): shard
                                  size, label indices, next shard id, the generations and per shard its image
                                  count and parts. `_plan/listing-<id>/` holds the listing while the plan is made
    model/                        pca_model.npz + pca_model.json; the model artifact (models.artifact's files)
    _fruitpipe_run.json           run marker: identity (fingerprint, listing digest, ...), state and lease
    csv/<table>/part-NNNNN.csv    CSV copies of pca, metadata and errors (features too when asked), vectors spread
                                  into numbered columns: each shard's projection task writes its parts (pca and
                                  features only for a shard with features), the driver errors/part-listing.csv
    csv/<table>.csv               instead of csv/<table>/ for a run of at most config.CSV_SINGLE_FILE_MAX_IMAGES
                                  images or one asked to (csv_merged): the parts streamed into one file, then removed
    model_info/model_info.json, variance.csv, config.yaml, manifest.json (written last, withdrawn first)
    evaluation/evaluation.json, evaluation/test_run/, report/index.html (written later, by evaluate and report)
    index/<space>.faiss, <space>.json, <space>-rows.parquet   a nearest-neighbour index over the pca or features
                                  vectors, its description, and the image each of its ids stands for (`fruitpipe index`)
    duplicates/groups.parquet, leaks.parquet, summary.json   near-duplicate groups, test images leaked from training
                                  and the nearest-neighbour distance histogram (`fruitpipe duplicates`)
    _scratch/<random>/            a query's images and their extraction while `fruitpipe similar` runs

Index and duplicates are added to a finished run: the manifest's entry is withdrawn first (`withdraw_output`),
the files written, then `list_outputs` rewrites the manifest whole, listing what is there now.

A run that grows (the same command after photos were added to or removed from the source) keeps its stored plan:
new images go into new shards of a new generation, shards that lost images are rewritten from their own parts
(`resume_shard`), and the PCA is refitted from every shard's stored statistics. The manifest lists the generations.

The lifecycle: a run claims OUT before it changes anything in it (the run marker says `in_progress` and holds the
run's lease), withdraws manifest.json, writes its outputs, then commits: manifest.json last, then the marker says
`finished` and the lease is gone. So a manifest never sits beside outputs it does not describe, and every reader
asks `require_finished` before it reads.

The lease names its owner (host, pid, a random run id, start time) and carries a heartbeat that a driver thread
refreshes every `heartbeat_s()` seconds. A second run finding a fresh lease is refused with the holder named; a
lease without a heartbeat for STALE_BEATS intervals, or whose process is gone from this host, is taken over with a
note. The marker is one small JSON object rewritten whole, the same on a local disk and on S3. Neither offers a
compare-and-swap, so a claim writes, waits a moment and reads back: of two runs claiming at once the last writer
wins and the other is refused. The holder reads the marker again at every heartbeat and before the manifest, so a
run that lost its folder never commits.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from fruitpipe import sinks
from fruitpipe.errors import FruitpipeError
from fruitpipe.models.artifact import (
    ARTIFACT_JSON,
    ARTIFACT_ONNX,
    ModelArtifact,
    load_artifact,
    write_artifact,
)
from fruitpipe.records import PLAN_VERSION, ImageRow, ShardPlan, ShardStats, records_digest
from fruitpipe.storage import (
    Location,
    exists,
    list_names,
    locate,
    read_bytes,
    remove_tree,
    seconds_from_env,
    with_retries,
    write_bytes,
)

if TYPE_CHECKING:
    import pandas as pd

    from fruitpipe.pca import GramStatistics, PcaModel

# The tables of a run, one folder of Parquet parts each (also the names `table` and RunResult.arrow take).
FEATURES = "features"
PCA = "pca"
METADATA = "metadata"
ERRORS = "errors"
TABLES = (FEATURES, PCA, METADATA, ERRORS)
# Every other path of the layout, relative to OUT.
RUN_MARKER = "_fruitpipe_run.json"
MANIFEST = "manifest.json"
MODEL_INFO = "model_info/model_info.json"
CONFIG_YAML = "config.yaml"
VARIANCE_CSV = "variance.csv"
SHARD_STATS = "_shards"
SHARD_GRAMS = "_gram"
PLAN = "_plan"
PLAN_JSON = f"{PLAN}/plan.json"
_PLAN_ROWS = "rows-"
_PLAN_LISTING = "listing-"
MODEL = "model"
PCA_MODEL_NPZ = f"{MODEL}/pca_model.npz"
PCA_MODEL_JSON = f"{MODEL}/pca_model.json"
LISTING_ERRORS = f"{ERRORS}/part-listing.parquet"
CSV = "csv"
CSV_COPIES = {name: f"{CSV}/{name}{sinks.CSV_SUFFIX}" for name in TABLES}
LISTING_ERRORS_CSV = f"{CSV}/{ERRORS}/part-listing{sinks.CSV_SUFFIX}"
# Vector tables spread into one CSV column per dimension: the column and the prefix of the numbered columns.
_CSV_VECTORS = {PCA: ("pca", "pc"), FEATURES: ("features", "f")}
# Each table's Parquet schema: its CSV header when it has no rows.
_TABLE_SCHEMAS = {FEATURES: sinks.vectors_schema("features"), PCA: sinks.vectors_schema("pca"),
                  METADATA: sinks.METADATA_SCHEMA, ERRORS: sinks.ERRORS_SCHEMA}
EVALUATION_JSON = "evaluation/evaluation.json"
EVALUATION_RUN = "evaluation/test_run"
REPORT_HTML = "report/index.html"
INDEX = "index"
DUPLICATES = "duplicates"
DUPLICATE_GROUPS = f"{DUPLICATES}/groups.parquet"
DUPLICATE_LEAKS = f"{DUPLICATES}/leaks.parquet"
DUPLICATE_SUMMARY = f"{DUPLICATES}/summary.json"
# Work that executors must reach, deleted when done (`similar` stages its queries and their extraction there).
SCRATCH = "_scratch"
_PART = re.compile(r"^part-(\d{5,})\.json$")
# storage.write_bytes writes `.<name>.<uuid4 hex>.tmp` and renames it; a killed writer leaves the temp behind.
_PARTIAL_WRITE = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")

IN_PROGRESS = "in_progress"
FINISHED = "finished"
# Seconds between heartbeats; FRUITPIPE_LEASE_HEARTBEAT_S overrides it (tests use a fraction of a second).
HEARTBEAT_S = 5.0
HEARTBEAT_ENV = "FRUITPIPE_LEASE_HEARTBEAT_S"
MIN_HEARTBEAT_S = 0.1
# A lease whose heartbeat is older than this many of its holder's intervals is stale: its run is gone.
STALE_BEATS = 3
# How long a claim waits before reading the marker back (at most a quarter of a heartbeat interval).
CLAIM_SETTLE_S = 0.5


def csv_tables(features_csv: bool) -> tuple[str, ...]:
    """The tables a run writes CSV copies of: pca, metadata and errors, and features when asked."""
    return (PCA, METADATA, ERRORS) + ((FEATURES,) if features_csv else ())


def heartbeat_s() -> float:
    """Seconds between heartbeats: FRUITPIPE_LEASE_HEARTBEAT_S, else HEARTBEAT_S."""
    return seconds_from_env(HEARTBEAT_ENV, HEARTBEAT_S, minimum=MIN_HEARTBEAT_S)


def read_marker(out: Location) -> dict[str, Any] | None:
    """The run marker of OUT, or None where there is none (OUT's path going through a file included)."""
    try:
        return sinks.read_json(out, RUN_MARKER)
    except (FileNotFoundError, NotADirectoryError):
        return None


def require_finished(run_dir: str) -> Location:
    """OUT, if it holds a finished run: its manifest present and no run in progress. Every reader of a run folder
    calls this first, so none reads outputs that a run is rewriting or left half rewritten."""
    out = locate(run_dir)
    try:
        marker = read_marker(out)
        has_manifest = exists(out, out.join(MANIFEST))
    except OSError as exc:
        raise FruitpipeError(f"cannot read run folder {run_dir}: {exc.strerror or exc}") from None
    if marker is None and not has_manifest:
        raise FruitpipeError(f"{run_dir} is not a fruitpipe run folder (no {MANIFEST}); "
                             "give the output folder of a finished `fruitpipe run`")
    if has_manifest and (marker or {}).get("state") != IN_PROGRESS:
        return out
    lease = (marker or {}).get("lease")
    if lease and not _gone(lease):
        raise FruitpipeError(f"{run_dir} is not a finished run: a run is writing it now ({_who(lease)}); "
                             "wait for it to finish")
    raise FruitpipeError(f"{run_dir} is not a finished run (a run there was cut short); "
                         "run the same command again to finish it")


def refuse_nested(source: str, output: str) -> None:
    """Refuse an output inside the source (the next run over the source would list the outputs as images) and a
    source inside the output (--overwrite would delete it), for local paths (symlinks resolved) and S3 prefixes."""
    src, out = locate(source), locate(output)
    if type(src.fs) is not type(out.fs):
        return
    src_path, out_path = (os.path.realpath(src.path), os.path.realpath(out.path)) if src.is_local else (src.path, out.path)
    if out_path == src_path:
        raise FruitpipeError(f"output {output} is the source folder itself; choose an output outside the source")
    if out_path.startswith(src_path.rstrip("/") + "/"):
        raise FruitpipeError(f"output {output} is inside the source {source}: a later run over the source would "
                             "list the outputs as images; choose an output outside the source")
    if src_path.startswith(out_path.rstrip("/") + "/"):
        raise FruitpipeError(f"source {source} is inside the output {output}: the run would write among its images "
                             "and --overwrite would delete them; choose an output outside the source")


def _held_by(output: str, lease: dict[str, Any]) -> FruitpipeError:
    return FruitpipeError(f"output {output} is being written by another run ({_who(lease)}); "
                          "wait for it to finish or choose another output")


def _who(lease: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("started_unix", 0))))
    age = time.time() - float(lease.get("heartbeat_unix", 0))
    return f"host {lease.get('host')}, pid {lease.get('pid')}, since {since}, last heartbeat {age:.0f} s ago"


def _gone(lease: dict[str, Any]) -> str:
    """Why `lease` no longer keeps others out: its process is gone from this host, or its heartbeat stopped;
    '' while its holder may be alive."""
    if lease.get("host") == socket.gethostname() and not _process_alive(int(lease.get("pid", 0)),
                                                                      lease.get("pid_started")):
        return "its process is gone"
    age = time.time() - float(lease.get("heartbeat_unix", 0))
    if age > STALE_BEATS * float(lease.get("heartbeat_s") or heartbeat_s()):
        return f"no heartbeat for {age:.0f} s"
    return ""


def _process_start(pid: int) -> str | None:
    """The start time of a live process (Linux /proc, clock ticks since boot): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _process_alive(pid: int, started: str | None) -> bool:
    if os.path.isdir("/proc/self"):
        now = _process_start(pid)
        return now is not None and (started is None or now == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ShardTables:
    """The three parts a shard task writes before its stats file."""

    features: pa.Table
    metadata: pa.Table
    errors: pa.Table


class RunFolder:
    """The run folder OUT: its lease and lifecycle (`check`, `claim`, `commit`), shard writes and resume
    (`write_shard`, `resume_shard`), and typed readers of a finished run (open it with `finished`).

    Use as a context manager around a run: leaving it without a commit (an error, Ctrl-C) releases the lease and
    leaves the folder marked in progress, for the next run to finish. Executors build their own from the output
    URI (`RunFolder(output)` only locates it), so no filesystem crosses a fork.
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self._out = locate(output)
        self._marker: dict[str, Any] = {}
        self._lease: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    @classmethod
    def finished(cls, run_dir: str) -> RunFolder:
        """The folder of a finished run, for reading; refused (one line) while a run writes it or after one broke."""
        require_finished(run_dir)
        return cls(run_dir)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._release()

    def uri(self, path: str = "") -> str:
        """Where `path` (a layout name, or the folder itself) is, as a user would type it."""
        return self._out.uri(self._out.join(path) if path else self._out.path)

    # -- the driver's lifecycle ----------------------------------------------------------------------------------

    def check(self, identity: Mapping[str, Any], overwrite: bool) -> None:
        """Before anything is written: refuse a folder holding something else, one another run holds, or (unless
        `overwrite`) a run of another configuration, rather than mix the two. `identity` holds fingerprint, model
        and source. A run over other images of the same source is not refused: it grows (fruitpipe.planning).
        A folder whose run was claimed but never planned (no fingerprint recorded) holds nothing to keep."""
        try:
            if self._out.call("isfile", self._out.path):
                raise FruitpipeError(f"output {self.output} is a file; choose a folder")
            names = list_names(self._out, self._out.path)
        except OSError as exc:
            raise FruitpipeError(f"cannot use output {self.output}: {exc.strerror or exc}") from None
        if not names:
            return
        if RUN_MARKER not in names:
            raise FruitpipeError(f"output {self.output} already holds files that are not a fruitpipe run; "
                                 "choose an empty or new folder")
        marker = sinks.read_json(self._out, RUN_MARKER)
        lease = marker.get("lease")
        if lease and not _gone(lease):
            raise _held_by(self.output, lease)
        if overwrite or "fingerprint" not in marker:
            return
        if marker.get("fingerprint") != identity.get("fingerprint"):
            raise FruitpipeError(f"output {self.output} holds a run with another configuration "
                                 f"(model {marker.get('model')}, source {marker.get('source')}); "
                                 "use --overwrite to replace it or choose another output")

    def claim(self, identity: Mapping[str, Any], replacing: bool) -> None:
        """Check OUT again (another run may have written it since), take the lease, mark the folder in progress and
        withdraw its manifest, before anything else changes; then clear it when `replacing` a run, else delete the
        temp files of writers killed mid-write.

        `identity` goes into the marker, except when replacing: the old run's identity stays until the clear is
        done, so an --overwrite cut short still refuses a plain re-run and can be redone. A new run's identity is
        completed by `record` once its plan is made.
        """
        self.check(identity, replacing)
        try:
            self._take_lease(identity, replacing)
            if replacing:
                for name in list_names(self._out, self._out.path):
                    if name != RUN_MARKER:
                        with contextlib.suppress(FileNotFoundError):  # e.g. the heartbeat's temp marker, renamed
                            remove_tree(self._out, self._out.join(name))
                self.record(identity)
            else:
                self._remove_partial_writes()
        except OSError as exc:
            raise FruitpipeError(f"cannot write to output {self.output}: {exc.strerror or exc}") from None

    def _take_lease(self, identity: Mapping[str, Any], replacing: bool) -> None:
        interval = heartbeat_s()
        current = read_marker(self._out)
        held = (current or {}).get("lease")
        if held:
            reason = _gone(held)
            if not reason:
                raise _held_by(self.output, held)
            print(f"fruitpipe: note: taking over {self.output} from a run that stopped ({_who(held)}: {reason})",
                  file=sys.stderr)
        kept = current if replacing and current else identity
        now = time.time()
        self._lease = {"run_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "pid_started": _process_start(os.getpid()), "started_unix": now, "heartbeat_unix": now,
                       "heartbeat_s": interval}
        self._marker = {**{k: v for k, v in kept.items() if k not in ("state", "lease")}, "state": IN_PROGRESS}
        self._write_marker()
        time.sleep(min(CLAIM_SETTLE_S, interval / 4))
        winner = self._holder()
        if winner is not None:
            self._lease = None
            raise _held_by(self.output, winner)
        remove_tree(self._out, self._out.join(MANIFEST))
        self._stop.clear()
        self._beats = threading.Thread(target=self._beat, args=(interval,), name="fruitpipe-lease", daemon=True)
        self._beats.start()

    def record(self, identity: Mapping[str, Any]) -> None:
        """The marker's identity: once the folder holds nothing of another run, and again when the plan is made
        (its image count and digest; a new run's fingerprint, whose shard size the plan decides)."""
        with self._lock:
            self._require_held()
            self._marker = {**identity, "state": IN_PROGRESS}
            self._write_marker()

    def _remove_partial_writes(self) -> None:
        """Delete the temp files killed writers left in a local run folder.

        Readers already skip them (hidden names, not `.parquet`); removing them keeps the folder clean. Object
        stores need nothing: an object is written in one PUT or not at all.
        """
        if not self._out.is_local:
            return
        for directory, _, names in os.walk(self._out.path):
            for name in names:
                if _PARTIAL_WRITE.match(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(directory, name))

    def commit(self, manifest: dict[str, Any], model_info: dict[str, Any] | None = None,
               config_yaml: str | None = None) -> None:
        """Write model_info and the resolved config (when given), then the manifest, last, if this run still holds
        the folder; then mark it finished and release it."""
        if model_info is not None:
            sinks.write_json(self._out, MODEL_INFO, model_info)
        if config_yaml is not None:
            write_bytes(self._out, self._out.join(CONFIG_YAML), config_yaml.encode())
        self._stop_beats()
        with self._lock:
            self._require_held()
            sinks.write_json(self._out, MANIFEST, manifest)
            self._marker["state"] = FINISHED
            self._lease = None
            self._write_marker()

    def outputs(self) -> dict[str, dict[str, Any]]:
        """Parts and rows of every table as they are now, from the Parquet footers (one read per part): for a
        finished folder listed again without its run's stats."""
        rows = {}
        for name in TABLES:
            parts = [n for n in list_names(self._out, self._out.join(name)) if n.endswith(sinks.PARQUET_SUFFIX)]
            rows[name] = [sinks.parquet_rows(self._out, f"{name}/{part}") for part in parts]
        return _listed_tables(rows)

    @staticmethod
    def outputs_of(stats: list[ShardStats], listing_errors: int) -> dict[str, dict[str, Any]]:
        """Parts and rows of every table summed from the shards' stats (what `outputs` reads from the footers,
        without reading them): a part per shard, a pca part per shard with features, the listing's errors part."""
        return _listed_tables({FEATURES: [s.ok for s in stats], PCA: [s.ok for s in stats if s.ok],
                               METADATA: [s.images for s in stats],
                               ERRORS: [s.failed for s in stats] + [listing_errors]})

    @staticmethod
    def documents(csv_copies: list[str]) -> list[str]:
        """The documents a run writes besides its tables, as the manifest lists them; `csv_copies` is what
        `write_csv_copies` wrote."""
        return [VARIANCE_CSV, MODEL_INFO, CONFIG_YAML, PCA_MODEL_NPZ, PCA_MODEL_JSON, f"{MODEL}/{ARTIFACT_ONNX}",
                f"{MODEL}/{ARTIFACT_JSON}", *csv_copies]

    # -- the driver's writes ---------------------------------------------------------------------------------------

    def write_artifact(self, artifact: ModelArtifact, onnx: bytes) -> None:
        write_artifact(self.uri(MODEL), artifact, onnx)

    def write_listing_errors(self, table: pa.Table) -> None:
        """The error rows of files the listing found but could not take as images."""
        sinks.write_parquet(self._out, LISTING_ERRORS, table)

    def clear(self, name: str) -> None:
        """Delete one table's parts (PCA before a re-projection: its k may have changed)."""
        remove_tree(self._out, self._out.join(name))

    def write_pca_model(self, model: PcaModel, description: str, variance: pa.Table) -> None:
        """The fitted PCA (npz), its description (JSON text) and the variance per component (CSV)."""
        write_bytes(self._out, self._out.join(PCA_MODEL_NPZ), model.to_npz_bytes())
        write_bytes(self._out, self._out.join(PCA_MODEL_JSON), description.encode())
        sinks.write_csv(self._out, VARIANCE_CSV, variance)

    def clear_csv_copies(self) -> None:
        """Delete every CSV copy, merged or in parts, before the shards write theirs again (a shard the run no
        longer holds must leave no part behind)."""
        remove_tree(self._out, self._out.join(CSV))

    def write_csv_parts(self, shard_id: int, tables: Mapping[str, pa.Table]) -> None:
        """One shard's CSV parts, one per table given (vectors spread into numbered columns)."""
        for name, table in tables.items():
            sinks.write_csv(self._out, _csv_part(name, shard_id), _csv_table(name, table))

    def write_csv_copies(self, tables: tuple[str, ...], merge: bool) -> list[str]:
        """After every shard wrote its CSV parts: the listing errors' part, then, with `merge`, each table's parts
        streamed into csv/<table>.csv (rows in part order, the listing's errors last) and removed. Returns the CSV
        copies as the manifest lists them: files, or the folders of parts."""
        sinks.write_csv(self._out, LISTING_ERRORS_CSV, sinks.read_parquet(self._out, LISTING_ERRORS))
        if not merge:
            return [f"{CSV}/{name}/" for name in tables if exists(self._out, self._out.join(CSV, name))]
        for name in tables:
            folder = f"{CSV}/{name}"
            parts = [f"{folder}/{part}" for part in list_names(self._out, self._out.join(folder))
                     if part.endswith(sinks.CSV_SUFFIX)]
            empty = _csv_table(name, _TABLE_SCHEMAS[name].empty_table())
            sinks.write_merged_csv(self._out, CSV_COPIES[name], parts, empty)
            remove_tree(self._out, self._out.join(folder))
        return [CSV_COPIES[name] for name in tables]

    # -- shards: executors write them, the driver resumes and reads them ------------------------------------------

    def write_shard(self, shard_id: int, tables: ShardTables, stats: Callable[[], ShardStats]) -> ShardStats:
        """Write a shard's parts whole, then its stats file: the commit record, so a shard with stats is done.

        `stats` is called between the two, so the stats can count the time the parts took to write.
        """
        sinks.write_parquet(self._out, _part(FEATURES, shard_id), tables.features)
        sinks.write_parquet(self._out, _part(METADATA, shard_id), tables.metadata)
        sinks.write_parquet(self._out, _part(ERRORS, shard_id), tables.errors)
        record = stats()
        sinks.write_json(self._out, _stats_path(shard_id), record.to_dict())
        return record

    def write_part(self, name: str, shard_id: int, table: pa.Table) -> None:
        """One shard's part of a table written after extraction (pca)."""
        sinks.write_parquet(self._out, _part(name, shard_id), table)

    def part(self, name: str, shard_id: int) -> pa.Table:
        """One shard's part of a table."""
        return sinks.read_parquet(self._out, _part(name, shard_id))

    def finished_shards(self) -> set[int]:
        """The shards whose stats file exists now (one listing): what progress counts."""
        names = list_names(self._out, self._out.join(SHARD_STATS))
        return {int(match.group(1)) for match in map(_PART.match, names) if match}

    def shard_stats(self, shard_id: int) -> ShardStats:
        return ShardStats.from_dict(sinks.read_json(self._out, _stats_path(shard_id)))

    def shard_gram(self, shard_id: int) -> GramStatistics:
        """A done shard's PCA sufficient statistics, from its features (a task's read)."""
        from fruitpipe.pca import GramStatistics

        return GramStatistics.of(sinks.vectors_matrix(self.part(FEATURES, shard_id), "features"))

    def generation_gram(self, generation: int, shards_digest: str) -> GramStatistics | None:
        """The stored PCA statistics of one generation's shards, if stored for exactly these shards as they are now
        (`shards_digest`), else None."""
        from fruitpipe.pca import GramStatistics

        try:
            return GramStatistics.from_bytes(read_bytes(self._out, self._out.join(_gram_path(generation,
                                                                                             shards_digest))))
        except FileNotFoundError:
            return None

    def write_generation_gram(self, generation: int, shards_digest: str, statistics: GramStatistics) -> None:
        """Store one generation's PCA statistics, replacing the generation's earlier ones (and any statistics a
        folder of an older format kept per shard)."""
        write_bytes(self._out, self._out.join(_gram_path(generation, shards_digest)), statistics.to_bytes())
        kept = _gram_path(generation, shards_digest).rsplit("/", 1)[1]
        for name in list_names(self._out, self._out.join(SHARD_GRAMS)):
            if name != kept and (name.startswith(f"generation-{generation:05d}-") or name.startswith("part-")):
                remove_tree(self._out, self._out.join(SHARD_GRAMS, name))

    def remove_shard(self, shard_id: int) -> None:
        """Delete everything of a shard the plan no longer holds (its images all left the source): stats first."""
        for path in (_stats_path(shard_id), *(_part(name, shard_id) for name in TABLES)):
            remove_tree(self._out, self._out.join(path))

    def resume_shard(self, shard_id: int, rows: list[ImageRow]) -> ShardStats | None:
        """A task's resume check of one planned shard: its stats when it is done with exactly `rows`; a done shard
        that held more images (some left the source) is rewritten from its own parts first, with no extraction.

        Anything else is not done: a shard without stats; one whose parts are missing, torn or disagree with its
        stats; one holding images to retry (a load timed out) or other images. Its stats file is deleted, so it is
        redone and a run killed while redoing it cannot mistake it for done.
        """
        try:
            stats = self.shard_stats(shard_id)
        except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
            return None
        if self._parts_agree(stats) and not stats.retryable:
            if stats.images == len(rows) and stats.images_sha256 == records_digest(rows):
                return stats
            if stats.images > len(rows):
                kept = self._kept_from_parts(shard_id, stats, rows)
                if kept is not None:
                    return kept
        remove_tree(self._out, self._out.join(_stats_path(shard_id)))
        return None

    def _parts_agree(self, stats: ShardStats) -> bool:
        """The shard's parts hold the rows its stats say (Parquet footers only)."""
        expected = {FEATURES: stats.ok, METADATA: stats.images, ERRORS: stats.failed}
        try:
            return stats.ok + stats.failed == stats.images and all(
                with_retries(lambda name=name: sinks.parquet_rows(self._out, _part(name, stats.shard_id))) == count
                for name, count in expected.items())
        except (OSError, ValueError):
            return False

    def _kept_from_parts(self, shard_id: int, stats: ShardStats, kept: list[ImageRow]) -> ShardStats | None:
        """Rewrite a done shard to hold only `kept`, from its own parts, with its statistics recomputed; None when its
        parts do not hold every kept image (then extraction redoes it). Kept images are unchanged by construction:
        the plan keeps an image in its shard only with the same path, size and version."""
        import pyarrow.compute as pc

        keep = pa.array([row.image_id for row in kept], pa.string())
        metadata = self.part(METADATA, shard_id)
        if pc.sum(pc.is_in(metadata.column("image_id"), value_set=keep)).as_py() != len(kept):
            return None
        remove_tree(self._out, self._out.join(_stats_path(shard_id)))
        tables = ShardTables(*(self._kept_rows(table, keep) for table in
                               (self.part(FEATURES, shard_id), metadata, self.part(ERRORS, shard_id))))
        return self.write_shard(shard_id, tables, lambda: replace(
            stats, images=len(kept), ok=tables.features.num_rows, failed=tables.errors.num_rows,
            images_sha256=records_digest(kept)))

    @staticmethod
    def _kept_rows(table: pa.Table, keep: pa.Array) -> pa.Table:
        import pyarrow.compute as pc

        return table.filter(pc.is_in(table.column("image_id"), value_set=keep))

    # -- the shard plan: parts written by tasks, plan.json by the driver ------------------------------------------

    def stored_plan(self) -> ShardPlan | None:
        """The shard plan the folder holds, or None: a new folder, or one whose plan is of an older format (it is
        planned afresh; its shards are kept where their images are unchanged)."""
        document = self._plan_document()
        return ShardPlan.from_dict(document) if document.get("version") == PLAN_VERSION else None

    def stored_shard_size(self) -> int | None:
        """The shard size the folder's run planned with: its plan's (of any format), else auto's for the image count
        its marker records (a folder made before plans were stored); None for a folder without a run."""
        from fruitpipe.config import auto_shard_size

        size = self._plan_document().get("shard_size")
        if size is not None:
            return int(size)
        images = (read_marker(self._out) or {}).get("images")
        return auto_shard_size(int(images)) if images else None

    def _plan_document(self) -> dict[str, Any]:
        try:
            return sinks.read_json(self._out, PLAN_JSON)
        except (FileNotFoundError, NotADirectoryError):  # `check` says what OUT holds instead
            return {}

    @staticmethod
    def new_plan_names() -> tuple[str, str]:
        """Fresh names for a plan's listing and its rows, so a new plan never overwrites the one stored."""
        token = uuid.uuid4().hex[:12]
        return _PLAN_LISTING + token, _PLAN_ROWS + token

    def write_plan_part(self, name: str, number: int, table: pa.Table, by_shard: bool = False) -> None:
        """One part of a listing or of a plan's rows (`name` from `new_plan_names`); plan rows `by_shard` (sorted by
        shard) get a row group per shard, so a shard task reads its own rows only (`shard_rows`)."""
        sinks.write_parquet(self._out, _plan_part(name, number), table, group_by="shard_id" if by_shard else None)

    def plan_part(self, name: str, number: int) -> pa.Table:
        return sinks.read_parquet(self._out, _plan_part(name, number))

    def write_plan(self, plan: ShardPlan) -> None:
        """Store the plan: its parts are written, so plan.json, which names them, goes last; then every older plan
        and listing in `_plan/` is deleted."""
        sinks.write_json(self._out, PLAN_JSON, plan.to_dict())
        for name in list_names(self._out, self._out.join(PLAN)):
            if name not in (plan.rows, PLAN_JSON.rsplit("/", 1)[1]):
                remove_tree(self._out, self._out.join(PLAN, name))

    def remove_plan_listing(self, name: str) -> None:
        remove_tree(self._out, self._out.join(PLAN, name))

    def shard_rows(self, plan_rows: str, shard_id: int, parts: tuple[int, ...]) -> list[ImageRow]:
        """A planned shard's images, in path order, read from the plan parts that hold them (a task's read)."""
        rows: list[ImageRow] = []
        for number in parts:
            table = sinks.read_parquet_where(self._out, _plan_part(plan_rows, number), "shard_id", shard_id)
            rows += map(ImageRow.from_dict, table.to_pylist())
        return sorted(rows, key=lambda row: row.path)

    # -- readers of a finished run ---------------------------------------------------------------------------------

    def table(self, name: str, columns: list[str] | None = None, at_most: int | None = None) -> pa.Table:
        """Every part of one table (features, pca, metadata, errors), in part order; with `at_most`, a sample of
        about that many rows of a larger table: every k-th part, spread over the whole run, by the manifest's
        counts."""
        every = 1
        if at_most is not None:
            listed = self.manifest()["outputs"][name]
            every = max(1, -(-int(listed["rows"]) // at_most))
        return sinks.read_dataset(self._out, name, columns, every)

    def manifest(self) -> dict[str, Any]:
        return sinks.read_json(self._out, MANIFEST)

    def model_info(self) -> dict[str, Any]:
        return sinks.read_json(self._out, MODEL_INFO)

    def config_text(self) -> str:
        """The resolved configuration the run wrote (YAML)."""
        return read_bytes(self._out, self._out.join(CONFIG_YAML)).decode()

    def pca_description(self) -> dict[str, Any]:
        """The fitted PCA's description (k, explained variance, what it was fitted on)."""
        return sinks.read_json(self._out, PCA_MODEL_JSON)

    def pca_model(self) -> PcaModel:
        """The PCA the run fitted, to project new features without refitting."""
        from fruitpipe.pca import PcaModel

        try:
            return PcaModel.from_npz_bytes(read_bytes(self._out, self._out.join(PCA_MODEL_NPZ)))
        except FileNotFoundError:
            raise FruitpipeError(f"{self.output} has no fitted PCA ({PCA_MODEL_NPZ} is missing); "
                                 "run the same command again to rewrite it") from None

    def artifact(self) -> tuple[ModelArtifact, bytes]:
        """The model artifact the run computed its features with, and its ONNX bytes (no torch, no export)."""
        from fruitpipe.models.specs import get_spec

        try:
            info = self.model_info()
            if exists(self._out, self._out.join(MODEL, ARTIFACT_JSON)):
                return load_artifact(self.uri(MODEL))
            # A run made before model/ held model.json: model_info.json records the same fields.
            artifact = ModelArtifact(spec=get_spec(info["model"]), input_size=int(info["image_size"]),
                                     precision=info.get("precision", "fp32"), weights_sha256=info["weights_sha256"],
                                     onnx_sha256=info["onnx_sha256"], weights=str(info.get("weights", "")))
            return artifact, read_bytes(self._out, self._out.join(MODEL, ARTIFACT_ONNX))
        except FileNotFoundError:
            raise FruitpipeError(f"{self.output} is not a finished fruitpipe run (no model_info or model)") from None

    def result(self) -> RunResult:
        """The run's RunResult read back from its manifest and model_info, loaders included."""
        try:
            manifest, info = self.manifest(), self.model_info()
        except FileNotFoundError:
            raise FruitpipeError(f"{self.output} is not a finished fruitpipe run (no {MANIFEST} or model_info)"
                                 ) from None
        return RunResult(output=self.output, images_listed=manifest["images_listed"],
                         images_ok=manifest["images_ok"], images_failed=manifest["images_failed"],
                         shards_total=manifest["shards"], shards_resumed=manifest["shards_resumed"],
                         pca_k=manifest["pca_k"], variance_kept=info["variance_kept"], seconds=info["seconds"],
                         model=manifest["model"], feature_dim=info["feature_dim"], executors=info["executors"],
                         spark_master=info.get("spark_master", ""),
                         hidden_files_skipped=manifest.get("hidden_files_skipped", 0),
                         images_retryable=manifest.get("images_retryable", 0))

    def evaluation(self) -> dict[str, Any] | None:
        """What `evaluate` wrote, or None before the run was evaluated."""
        try:
            return sinks.read_json(self._out, EVALUATION_JSON)
        except FileNotFoundError:
            return None

    def write_evaluation(self, document: dict[str, Any]) -> None:
        sinks.write_json(self._out, EVALUATION_JSON, document)

    def write_report(self, page: str) -> str:
        """Write the report page; returns where it is."""
        write_bytes(self._out, self._out.join(REPORT_HTML), page.encode("utf-8"))
        return self.uri(REPORT_HTML)

    # -- added to a finished run: nearest-neighbour index and near-duplicates --------------------------------------

    def write_index(self, space: str, index: bytes, rows: pa.Table, description: dict[str, Any]) -> None:
        """One space's serialised faiss index, the image each id stands for (row i = id i), and its description."""
        write_bytes(self._out, self._out.join(_index_path(space, ".faiss")), index)
        sinks.write_parquet(self._out, _index_path(space, "-rows.parquet"), rows)
        sinks.write_json(self._out, _index_path(space, ".json"), description)

    def index(self, space: str) -> StoredIndex:
        """The index `fruitpipe index` built over `space` (pca or features); refused in one line when there is none
        or when the manifest no longer lists it (the run was resumed since)."""
        option = "" if space == PCA else f" --space {space}"
        rebuild = f"build it with `fruitpipe index {self.output}{option}`"
        try:
            description = sinks.read_json(self._out, _index_path(space, ".json"))
            stored = StoredIndex(read_bytes(self._out, self._out.join(_index_path(space, ".faiss"))),
                                 sinks.read_parquet(self._out, _index_path(space, "-rows.parquet")), description)
        except FileNotFoundError:
            raise FruitpipeError(f"{self.output} has no {space} index; {rebuild}") from None
        if space not in self.manifest()["outputs"].get(INDEX, {}).get("spaces", {}):
            raise FruitpipeError(f"the {space} index of {self.output} is older than its outputs (the manifest no "
                                 f"longer lists it); {rebuild} again")
        return stored

    def index_spaces(self) -> list[str]:
        """The spaces an index was built for."""
        return sorted(name[:-len(".json")] for name in list_names(self._out, self._out.join(INDEX))
                      if name.endswith(".json"))

    def write_duplicates(self, groups: pa.Table, leaks: pa.Table | None, summary: dict[str, Any]) -> None:
        """Near-duplicate groups, leaked test images (None: no test run given; an older leaks file goes) and the
        summary, written last."""
        sinks.write_parquet(self._out, DUPLICATE_GROUPS, groups)
        if leaks is None:
            remove_tree(self._out, self._out.join(DUPLICATE_LEAKS))
        else:
            sinks.write_parquet(self._out, DUPLICATE_LEAKS, leaks)
        sinks.write_json(self._out, DUPLICATE_SUMMARY, summary)

    def duplicates(self) -> Duplicates | None:
        """What `fruitpipe duplicates` wrote, or None before it ran or when the manifest no longer lists it (the
        run was resumed since: its images may have changed)."""
        if DUPLICATES not in self.manifest()["outputs"]:
            return None
        return self._stored_duplicates()

    def _stored_duplicates(self) -> Duplicates | None:
        try:
            summary = sinks.read_json(self._out, DUPLICATE_SUMMARY)
            groups = sinks.read_parquet(self._out, DUPLICATE_GROUPS)
        except FileNotFoundError:
            return None
        leaks = sinks.read_parquet(self._out, DUPLICATE_LEAKS) if summary.get("test_run") else None
        return Duplicates(groups, leaks, summary)

    def withdraw_output(self, name: str) -> None:
        """Drop INDEX or DUPLICATES from a finished run's manifest before its files are rewritten, so the manifest
        never lists files in the middle of a rewrite."""
        manifest = self._finished_manifest()
        if manifest["outputs"].pop(name, None) is not None:
            sinks.write_json(self._out, MANIFEST, manifest)

    def list_outputs(self) -> None:
        """Rewrite a finished run's manifest listing its tables, index and duplicates as they are now (one whole
        write, after their files)."""
        manifest = self._finished_manifest()
        manifest["outputs"] = {**manifest["outputs"], **self.outputs()}
        spaces = self.index_spaces()
        if spaces:
            manifest["outputs"][INDEX] = {"format": "faiss", "spaces": {
                space: {key: value for key, value in sinks.read_json(self._out, _index_path(space, ".json")).items()
                        if key in ("kind", "metric", "count", "dim")} for space in spaces}}
        found = self._stored_duplicates()
        if found is not None:
            manifest["outputs"][DUPLICATES] = {"format": "parquet", "groups_rows": found.groups.num_rows,
                                               "leaks_rows": None if found.leaks is None else found.leaks.num_rows,
                                               "summary": DUPLICATE_SUMMARY}
        sinks.write_json(self._out, MANIFEST, manifest)

    @contextlib.contextmanager
    def scratch(self) -> Iterator[str]:
        """A fresh folder inside the run, where executors reach as they reached the run, deleted afterwards."""
        path = f"{SCRATCH}/{uuid.uuid4().hex}"
        try:
            yield self.uri(path)
        finally:
            remove_tree(self._out, self._out.join(path))
            if self._out.is_local:
                with contextlib.suppress(OSError):  # still in use by another query: it stays
                    os.rmdir(self._out.join(SCRATCH))

    def _finished_manifest(self) -> dict[str, Any]:
        require_finished(self.output)
        return self.manifest()

    # -- the lease -------------------------------------------------------------------------------------------------

    def _release(self) -> None:
        """Drop the lease, if still held, leaving the folder marked in progress (a run that failed or stopped)."""
        self._stop_beats()
        with self._lock:
            if self._lease is None:
                return
            try:
                if self._holder() is None:
                    self._lease = None
                    self._write_marker()
            except (OSError, FruitpipeError):
                pass  # the failure being reported matters more; the lease goes stale by itself
            self._lease = None

    def _stop_beats(self) -> None:
        self._stop.set()
        if self._beats is not None:
            self._beats.join()
            self._beats = None

    def _write_marker(self) -> None:
        lease = None if self._lease is None else {**self._lease, "heartbeat_unix": time.time()}
        sinks.write_json(self._out, RUN_MARKER, {**self._marker, **({"lease": lease} if lease else {})})

    def _holder(self) -> dict[str, Any] | None:
        """The lease of the run that took the folder from this one (`{}`: the marker is gone); None while held."""
        return self._holder_of(read_marker(self._out))

    def _holder_of(self, marker: dict[str, Any] | None) -> dict[str, Any] | None:
        lease = (marker or {}).get("lease") or {}
        return None if self._lease and lease.get("run_id") == self._lease["run_id"] else lease

    def _require_held(self) -> None:
        holder = self._holder()
        if holder is not None:
            self._lease = None
            what = f"another run ({_who(holder)})" if holder else "someone (its run marker is gone)"
            raise FruitpipeError(f"output {self.output} was taken over by {what}; this run stops without "
                                 "writing its manifest")

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                if self._lease is None:
                    return
                try:
                    if self._holder() is not None:
                        return  # taken over: stop beating; commit refuses
                    self._write_marker()
                except (OSError, FruitpipeError):
                    pass  # a storage hiccup: the next beat tries again, well before the lease goes stale


@dataclass(frozen=True)
class StoredIndex:
    """A run's nearest-neighbour index as stored: faiss bytes, the image of each id, and its description."""

    data: bytes
    rows: pa.Table
    description: dict[str, Any]


@dataclass(frozen=True)
class Duplicates:
    """What `fruitpipe duplicates` found: groups (group_id, image_id, path, label, distance), leaks (test_path,
    test_label, train_path, train_label, distance; None without a test run) and the summary document."""

    groups: pa.Table
    leaks: pa.Table | None
    summary: dict[str, Any]


@dataclass
class RunResult:
    """What a run produced: where, how many, how much variance, how long; loaders for notebooks."""

    output: str
    images_listed: int
    images_ok: int
    images_failed: int
    shards_total: int
    shards_resumed: int
    pca_k: int
    variance_kept: float
    seconds: dict[str, float]
    model: str
    feature_dim: int
    executors: list[str] = field(default_factory=list)
    spark_master: str = ""
    hidden_files_skipped: int = 0
    # Images whose loads timed out on every attempt: not a verdict on them; the next run of the command retries them.
    images_retryable: int = 0

    @property
    def images_per_second(self) -> float:
        total = self.seconds.get("total", 0.0)
        return self.images_listed / total if total > 0 else 0.0

    def _table(self, name: str) -> pa.Table:
        return RunFolder.finished(self.output).table(name)

    def features(self) -> pd.DataFrame:
        """Features as pandas: key columns and a `features` column of float32 arrays."""
        return self._table(FEATURES).to_pandas()

    def pca(self) -> pd.DataFrame:
        return self._table(PCA).to_pandas()

    def metadata(self) -> pd.DataFrame:
        return self._table(METADATA).to_pandas()

    def errors(self) -> pd.DataFrame:
        return self._table(ERRORS).to_pandas()

    def arrow(self, name: str) -> pa.Table:
        """Any table (features, pca, metadata, errors) as an Arrow table."""
        return self._table(name)


def load_run(run_dir: str) -> RunResult:
    """A finished run's RunResult read back from its folder (local or s3://), loaders included."""
    return RunFolder.finished(run_dir).result()


def _part(name: str, shard_id: int) -> str:
    return f"{name}/part-{shard_id:05d}{sinks.PARQUET_SUFFIX}"


def _csv_part(name: str, shard_id: int) -> str:
    return f"{CSV}/{name}/part-{shard_id:05d}{sinks.CSV_SUFFIX}"


def _csv_table(name: str, table: pa.Table) -> pa.Table:
    """A table as its CSV copy holds it: a vector column spread into one numbered column per dimension."""
    return sinks.expand_vectors(table, *_CSV_VECTORS[name]) if name in _CSV_VECTORS else table


def _listed_tables(rows: Mapping[str, list[int]]) -> dict[str, dict[str, Any]]:
    """The manifest's entry of each table from the rows of each of its parts."""
    return {name: {"format": "parquet", "parts": len(rows[name]), "rows": sum(rows[name])} for name in TABLES}


def _index_path(space: str, suffix: str) -> str:
    return f"{INDEX}/{space}{suffix}"


def _stats_path(shard_id: int) -> str:
    return f"{SHARD_STATS}/part-{shard_id:05d}.json"


def _gram_path(generation: int, shards_digest: str) -> str:
    return f"{SHARD_GRAMS}/generation-{generation:05d}-{shards_digest}.npz"


def _plan_part(name: str, number: int) -> str:
    return f"{PLAN}/{name}/part-{number:05d}{sinks.PARQUET_SUFFIX}"
