"""Who may write a run folder, and whether what it holds is a finished run.

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

import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from fruitpipe import sinks
from fruitpipe.errors import FruitpipeError
from fruitpipe.storage import Location, exists, locate, remove_tree, seconds_from_env

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

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


def heartbeat_s() -> float:
    """Seconds between heartbeats: FRUITPIPE_LEASE_HEARTBEAT_S, else HEARTBEAT_S."""
    return seconds_from_env(HEARTBEAT_ENV, HEARTBEAT_S, minimum=MIN_HEARTBEAT_S)


def read_marker(out: Location) -> dict[str, Any] | None:
    """The run marker of OUT, or None where there is none."""
    try:
        return sinks.read_json(out, sinks.RUN_MARKER)
    except FileNotFoundError:
        return None


def require_finished(run_dir: str) -> Location:
    """OUT, if it holds a finished run: its manifest present and no run in progress. Every reader of a run folder
    calls this first, so none reads outputs that a run is rewriting or left half rewritten."""
    out = locate(run_dir)
    try:
        marker = read_marker(out)
        has_manifest = exists(out, out.join(sinks.MANIFEST))
    except OSError as exc:
        raise FruitpipeError(f"cannot read run folder {run_dir}: {exc.strerror or exc}") from None
    if marker is None and not has_manifest:
        raise FruitpipeError(f"{run_dir} is not a fruitpipe run folder (no {sinks.MANIFEST}); "
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


def check_not_held(marker: dict[str, Any], output: str) -> None:
    """Refuse OUT while another run holds a fresh lease on it, naming that run; nothing is touched."""
    lease = marker.get("lease")
    if lease and not _gone(lease):
        raise _held_by(output, lease)


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


class RunFolder:
    """One run's hold on its output folder: `claim` it, `record` what it holds, `commit` the manifest.

    Use as a context manager around the run: leaving it without a commit (an error, Ctrl-C) releases the lease and
    leaves the folder marked in progress, for the next run to finish.
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self._out = locate(output)
        self._marker: dict[str, Any] = {}
        self._lease: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._release()

    def claim(self, identity: dict[str, Any], replacing: bool) -> None:
        """Take the lease, mark the folder in progress and withdraw its manifest, before anything else changes.

        `identity` (fingerprint, listing digest, ...) goes into the marker, except when `replacing` a run: its
        identity stays until `record`, so an --overwrite cut short still refuses a plain re-run.
        """
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
        remove_tree(self._out, self._out.join(sinks.MANIFEST))
        self._stop.clear()
        self._beats = threading.Thread(target=self._beat, args=(interval,), name="fruitpipe-lease", daemon=True)
        self._beats.start()

    def record(self, identity: dict[str, Any]) -> None:
        """The marker's identity once the folder holds nothing of another run."""
        with self._lock:
            self._require_held()
            self._marker = {**identity, "state": IN_PROGRESS}
            self._write_marker()

    def commit(self, manifest: dict[str, Any]) -> None:
        """Write the manifest, last, if this run still holds the folder; then mark it finished and release it."""
        self._stop_beats()
        with self._lock:
            self._require_held()
            sinks.write_json(self._out, sinks.MANIFEST, manifest)
            self._marker["state"] = FINISHED
            self._lease = None
            self._write_marker()

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
        sinks.write_json(self._out, sinks.RUN_MARKER, {**self._marker, **({"lease": lease} if lease else {})})

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

    def _table(self, directory: str) -> pa.Table:
        return sinks.read_dataset(require_finished(self.output), directory)

    def features(self) -> pd.DataFrame:
        """Features as pandas: key columns and a `features` column of float32 arrays."""
        return self._table(sinks.FEATURES).to_pandas()

    def pca(self) -> pd.DataFrame:
        return self._table(sinks.PCA).to_pandas()

    def metadata(self) -> pd.DataFrame:
        return self._table(sinks.METADATA).to_pandas()

    def errors(self) -> pd.DataFrame:
        return self._table(sinks.ERRORS).to_pandas()

    def arrow(self, directory: str) -> pa.Table:
        """Any output folder (features, pca, metadata, errors) as an Arrow table."""
        return self._table(directory)


def load_run(run_dir: str) -> RunResult:
    """A finished run's RunResult read back from its folder (local or s3://), loaders included."""
    out = require_finished(run_dir)
    try:
        manifest = sinks.read_json(out, sinks.MANIFEST)
        info = sinks.read_json(out, f"{sinks.MODEL_INFO}/model_info.json")
    except FileNotFoundError:
        raise FruitpipeError(f"{run_dir} is not a finished fruitpipe run (no manifest.json or model_info)") from None
    return RunResult(output=run_dir, images_listed=manifest["images_listed"], images_ok=manifest["images_ok"],
                     images_failed=manifest["images_failed"], shards_total=manifest["shards"],
                     shards_resumed=manifest["shards_resumed"], pca_k=manifest["pca_k"],
                     variance_kept=info["variance_kept"], seconds=info["seconds"], model=manifest["model"],
                     feature_dim=info["feature_dim"], executors=info["executors"],
                     spark_master=info.get("spark_master", ""),
                     hidden_files_skipped=manifest.get("hidden_files_skipped", 0),
                     images_retryable=manifest.get("images_retryable", 0))
