"""Reading and writing any fsspec URI (local paths, file://, s3://) the way the pipeline needs it.

Filesystem objects are created where they are used (inside each Spark task), never pickled across a fork:
s3fs is not fork-safe. Every object is written whole in one call (temp + rename on local disks, a single PUT
on object stores), so a reader never sees half a file and an interrupted run leaves nothing torn.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")

# Errors worth retrying: the store was briefly unreachable or answered 5xx / throttled.
_TRANSIENT_NAMES = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "EndpointConnectionError",
                    "ClientOSError", "ServerDisconnectedError", "TimeoutError", "SlowDown",
                    "ServiceUnavailable", "InternalError", "ConnectionResetError", "BrokenPipeError",
                    "IncompleteRead", "ClientConnectorError", "ServerTimeoutError", "ProtocolError")


@dataclass(frozen=True)
class Location:
    """A filesystem and a path inside it, built from a URI."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])

    def uri(self, path: str | None = None) -> str:
        """The full URI of `path` (default: this location), as the user would write it."""
        target = self.path if path is None else path
        if self.is_local:
            return target
        return self.fs.unstrip_protocol(target)


def locate(uri: str) -> Location:
    """Resolve a URI or local path to a filesystem (fresh in this process) and a path."""
    fs, path = fsspec.core.url_to_fs(os.path.expanduser(uri), skip_instance_cache=True)
    return Location(fs, path.rstrip("/") or path)


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry may cure (network blips, throttling, server errors)."""
    for error in _chain(exc):
        if type(error).__name__ in _TRANSIENT_NAMES or isinstance(error, (ConnectionError, TimeoutError)):
            return True
        status = getattr(error, "response", None)
        if isinstance(status, dict):
            code = status.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code >= 500 or code == 429:
                return True
        text = str(error)
        if any(marker in text for marker in ("503", "500 Internal", "SlowDown", "Connection refused")):
            return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def with_retries(action: Callable[[], T], attempts: int = 6, base_delay: float = 0.5, max_delay: float = 8.0) -> T:
    """Run `action`, retrying transient storage errors with jittered exponential backoff."""
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            time.sleep(delay * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


def read_bytes(location: Location, path: str) -> bytes:
    """The whole object at `path`, retried on transient errors."""
    return with_retries(lambda: location.fs.cat_file(path))


def write_bytes(location: Location, path: str, data: bytes) -> None:
    """Write `data` to `path` whole: temp file + atomic rename locally, one PUT on object stores."""
    if location.is_local:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        return
    with_retries(lambda: location.fs.pipe_file(path, data))


def exists(location: Location, path: str) -> bool:
    return with_retries(lambda: location.fs.exists(path))


def list_names(location: Location, directory: str) -> list[str]:
    """Base names of the objects directly in `directory` (empty when it does not exist)."""
    def listing() -> list[str]:
        try:
            entries = location.fs.ls(directory, detail=False, refresh=True) if not location.is_local \
                else location.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries)
    return with_retries(listing)


def find_files(location: Location, root: str) -> dict[str, int]:
    """Every file below `root` as {path: size}, from flat listings (one paged prefix listing on S3)."""
    def listing() -> dict[str, int]:
        try:
            found = location.fs.find(root, detail=True)
        except FileNotFoundError:
            return {}
        return {path: int(info.get("size") or 0) for path, info in found.items() if info.get("type") != "directory"}
    return with_retries(listing)


def remove_tree(location: Location, path: str) -> None:
    """Delete `path` and everything below it, if present."""
    if exists(location, path):
        with_retries(lambda: location.fs.rm(path, recursive=True))
