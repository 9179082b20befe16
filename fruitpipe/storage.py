"""Reading and writing any fsspec URI (local paths, file://, s3://) the way the pipeline needs it.

Filesystem objects are created where they are used (inside each Spark task), never pickled across a fork:
s3fs is not fork-safe. Every object is written whole in one call (temp + rename on local disks, a single PUT
on object stores; a file streamed from chunks, `write_chunks`, as one multipart upload completed after its last
chunk), so a reader never sees half a file and an interrupted run leaves nothing torn.

Listings are never cached: executors write the run folder while the driver reads it, and s3fs's listing cache
would let the driver's resume check and manifest miss what they wrote.

Credentials and endpoints come from the standard AWS chain (environment, profile, instance role;
`AWS_ENDPOINT_URL` for S3-compatible stores), read by botocore on each node; fruitpipe never handles them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem

from fruitpipe.errors import FruitpipeError

T = TypeVar("T")

# How long one storage operation keeps retrying transient errors before the run gives up on the store; below the
# per-image read timeout (60 s by default), so an outage fails the task instead of timing images out.
# FRUITPIPE_STORAGE_RETRY_S overrides it (executors read their own environment: spark.executorEnv.* on a cluster).
RETRY_BUDGET_S = 30.0
RETRY_BUDGET_ENV = "FRUITPIPE_STORAGE_RETRY_S"
# How long one call to a store over the network may take, plus a second per MB it sends, before it is cancelled
# as hung and retried on a fresh connection pool. The S3 client's own timeouts cover connecting and each read,
# not waiting for a free pooled connection: a call could wait there forever (issue 14, item 10).
# FRUITPIPE_STORAGE_TIMEOUT_S overrides it.
CALL_TIMEOUT_S = 30.0
CALL_TIMEOUT_ENV = "FRUITPIPE_STORAGE_TIMEOUT_S"
_SECONDS_PER_MB_SENT = 1.0
_RECONNECT_TIMEOUT_S = 10.0
# Keys per S3 listing call: the API's maximum.
LIST_PAGE_KEYS = 1000

# Errors worth retrying: the store was briefly unreachable or answered 5xx / throttled.
_TRANSIENT_NAMES = frozenset({
    "ConnectionError", "ConnectTimeout", "ConnectTimeoutError", "ReadTimeout", "ReadTimeoutError",
    "EndpointConnectionError", "ConnectionClosedError", "HTTPClientError", "ResponseParserError",
    "ClientOSError", "ClientConnectorError", "ClientPayloadError", "ServerDisconnectedError",
    "ServerTimeoutError", "IncompleteRead", "ProtocolError", "FSTimeoutError",
})
_TRANSIENT_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                              "ThrottlingException", "RequestLimitExceeded", "503", "500", "502", "504"})
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                               errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH})
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


# aiohttp leaves the body-writer task of a request cut by a reset unretrieved, and asyncio then prints its traceback
# ("Task exception was never retrieved") although the failure already reached the caller, who retries it.
logging.getLogger("asyncio").setLevel(logging.CRITICAL)


class StorageUnavailable(FruitpipeError):
    """The store stayed unreachable through every retry: the run stops with this one line, the next one resumes."""


class NoSpaceLeft(FruitpipeError):
    """The disk (or quota) holding an output is full: retrying cannot help, freeing space and re-running does."""


# Errors a Spark task raises that the user must see as their own one line: Spark hands the driver a task's exception
# only as text (the worker's traceback inside a JVM stack trace), so unavailable_reported() finds them by name.
_REPORTED_FROM_TASKS = (StorageUnavailable, NoSpaceLeft)
_TASK_ERROR_LINE = re.compile(r"\b(" + "|".join(error.__name__ for error in _REPORTED_FROM_TASKS) + r"): (.+)")
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class Location:
    """A filesystem and a path inside it, built from a URI."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def call(self, method: str, *args: object, sends_bytes: int = 0, **kwargs: object) -> Any:
        """`fs.<method>(*args, **kwargs)`, cancelled after call_timeout_s() on a store reached over the network.

        A cancelled call leaves the client's connection pool suspect (that is where calls hang), so the client is
        rebuilt before the caller's retry.
        """
        if not self.fs.async_impl:
            return getattr(self.fs, method)(*args, **kwargs)
        kwargs["timeout"] = call_timeout_s() + sends_bytes / 1e6 * _SECONDS_PER_MB_SENT
        try:
            return getattr(self.fs, method)(*args, **kwargs)
        except FSTimeoutError:
            reconnect = getattr(self.fs, "connect", None)
            if reconnect is not None:
                with contextlib.suppress(Exception):
                    reconnect(refresh=True, timeout=_RECONNECT_TIMEOUT_S)
            raise

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])

    def uri(self, path: str | None = None) -> str:
        """The full URI of `path` (default: this location), as the user would write it."""
        target = self.path if path is None else path
        if self.is_local:
            return target
        return self.fs.unstrip_protocol(target)


def locate(uri: str) -> Location:
    """Resolve a URI or local path to a filesystem (fresh in this process, listings uncached) and a path."""
    fs, path = fsspec.core.url_to_fs(os.path.expanduser(uri), skip_instance_cache=True, use_listings_cache=False)
    return Location(fs, path.rstrip("/") or path)


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry may cure (network blips, throttling, server errors), never for missing files."""
    if isinstance(exc, _PERMANENT):
        return False
    for error in _chain(exc):
        if isinstance(error, StorageUnavailable):
            return False
        if type(error).__name__ in _TRANSIENT_NAMES or isinstance(error, (ConnectionError, TimeoutError)):
            return True
        if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
            return True
        response = getattr(error, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = str(response.get("Error", {}).get("Code", ""))
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def retry_budget_s() -> float:
    """Seconds of retrying before a store counts as unavailable: FRUITPIPE_STORAGE_RETRY_S, else RETRY_BUDGET_S."""
    return seconds_from_env(RETRY_BUDGET_ENV, RETRY_BUDGET_S, minimum=0.0)


def call_timeout_s() -> float:
    """Seconds one storage call may take: FRUITPIPE_STORAGE_TIMEOUT_S, else CALL_TIMEOUT_S."""
    return seconds_from_env(CALL_TIMEOUT_ENV, CALL_TIMEOUT_S, minimum=1.0)


def seconds_from_env(name: str, default: float, minimum: float) -> float:
    """A duration setting from the environment (executors read their own), checked like a flag: one clear line."""
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < minimum:
        raise FruitpipeError(f"{name} must be a number of seconds >= {minimum:g}, got {text!r}")
    return value


def with_retries(action: Callable[[], T], what: str = "storage", budget_s: float | None = None,
                 base_delay: float = 0.5, max_delay: float = 8.0) -> T:
    """Run `action`, retrying transient storage errors with jittered exponential backoff for up to `budget_s`
    (default: retry_budget_s()).

    A store still failing after that raises StorageUnavailable (inside a Spark task: the task fails, Spark
    retries it, and a run that cannot finish stops with one line and resumes next time). A failed first try is
    always retried once, even when it alone took longer than the budget (a call cancelled as hung).
    """
    budget_s = retry_budget_s() if budget_s is None else budget_s
    started = time.monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            elapsed = time.monotonic() - started
            if attempt > 1 and elapsed + delay > budget_s:
                raise StorageUnavailable(
                    f"storage unreachable: {what}: {_first_line(exc)} (gave up after {attempt} tries in "
                    f"{elapsed:.0f} s); run the same command again to resume") from exc
            time.sleep(delay)


def read_bytes(location: Location, path: str) -> bytes:
    """The whole object at `path`, retried on transient errors (one GET on S3: no size probe first)."""
    options = {} if location.is_local or "s3" not in location.fs.protocol else {"max_concurrency": 1}
    return with_retries(lambda: location.call("cat_file", path, **options), location.uri(path))


def read_tail(location: Location, path: str, size: int) -> bytes:
    """The last `size` bytes of the object at `path` (all of it when smaller): one ranged GET on S3."""
    return with_retries(lambda: location.call("cat_file", path, start=-size), location.uri(path))


def write_bytes(location: Location, path: str, data: bytes) -> None:
    """Write `data` to `path` whole: temp file + atomic rename locally, one PUT on object stores.

    A local write that fails removes its temp file (a full disk must not fill up further with one temp file per
    Spark retry); a full disk or quota raises NoSpaceLeft.
    """
    if not location.is_local:
        with_retries(lambda: location.call("pipe_file", path, data, sends_bytes=len(data)), location.uri(path))
        return
    _write_local(path, [data])


def write_chunks(location: Location, path: str, chunks: Callable[[], Iterable[bytes | memoryview]]) -> None:
    """Write the bytes `chunks()` yields to `path` whole, holding one chunk at a time (a file too big for memory):
    temp file + atomic rename locally; on object stores a multipart upload completed only after the last chunk
    (aborted on failure, so no torn object is left) and redone from a fresh `chunks()` on transient errors."""
    if location.is_local:
        _write_local(path, chunks())
        return

    def upload() -> None:
        handle = location.fs.open(path, "wb", autocommit=False)
        try:
            for chunk in chunks():
                handle.write(chunk)
            handle.close()
            handle.commit()
        except BaseException:
            with contextlib.suppress(Exception):  # the upload's own error says what went wrong
                handle.discard()
            handle.closed = True  # so that garbage collection does not close it, which would upload what it holds
            raise
    with_retries(upload, location.uri(path))


def _write_local(path: str, chunks: Iterable[bytes | memoryview]) -> None:
    directory = os.path.dirname(path)
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(temporary, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
            raise NoSpaceLeft(f"no space left on {directory} ({exc.strerror}, writing {os.path.basename(path)}); "
                              "free some space and run the same command again to resume") from None
        raise


def exists(location: Location, path: str) -> bool:
    return with_retries(lambda: location.call("exists", path), location.uri(path))


def list_names(location: Location, directory: str) -> list[str]:
    """Base names of the objects and folders directly in `directory`, listed now (empty when it does not exist)."""
    def listing() -> list[str]:
        try:
            entries = location.call("ls", directory, detail=False)
        except FileNotFoundError:
            return []
        return sorted(entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.rstrip("/") != directory)
    return with_retries(listing, location.uri(directory))


@dataclass(frozen=True)
class ListedFile:
    """One listed file: its size, a version that changes when its content is rewritten (mtime locally, ETag on S3,
    else the last-modified time), and `problem`, why it cannot be read as a file ('' for a regular file)."""

    size: int
    version: str
    problem: str = ""


def find_files(location: Location, root: str, above: tuple[str, ...] = ()) -> dict[str, ListedFile]:
    """Every file below `root` as {path: ListedFile}, from one flat listing (paged prefix listing on S3, 1,000 keys a
    call, each page retried on its own; never a walk per folder). Zero-byte `name/` folder markers that consoles create are not files.

    Local folders are walked following folder symlinks (a link back to a folder above it, `above` included, is
    reported, not followed); FIFOs, sockets, devices, broken links and unlistable folders are reported with their
    problem, so nobody opens a FIFO and waits forever. With `above`, `root` is one folder of a larger listing: if
    it cannot be listed, that is reported too instead of raised.
    """
    def listing() -> dict[str, ListedFile]:
        if location.is_local:
            return _local_files(root, above)
        try:
            found = location.call("find", root, detail=True)
        except FileNotFoundError:
            return {}
        return {path: ListedFile(int(info.get("size") or 0), _object_version(info)) for path, info in found.items()
                if info.get("type") != "directory" and not path.endswith("/")}
    if _is_s3(location):
        return _s3_files(location, root)
    return _listed(listing, location.uri(root))


def _is_s3(location: Location) -> bool:
    protocols = location.fs.protocol if isinstance(location.fs.protocol, tuple) else (location.fs.protocol,)
    return "s3" in protocols


def _s3_files(location: Location, root: str) -> dict[str, ListedFile]:
    """An S3 prefix listed page by page (ListObjectsV2, LIST_PAGE_KEYS keys a call), each page one call with its
    own timeout and retries: one call for the whole prefix would be cancelled past a few hundred thousand keys."""
    bucket, _, prefix = root.strip("/").partition("/")
    request = {"Bucket": bucket, "Prefix": f"{prefix}/" if prefix else "", "MaxKeys": LIST_PAGE_KEYS}
    found: dict[str, ListedFile] = {}
    while True:
        try:
            page = _listed(lambda: location.call("call_s3", "list_objects_v2", **request), location.uri(root))
        except FileNotFoundError:  # no such bucket
            return {}
        for item in page.get("Contents", []):
            if not item["Key"].endswith("/"):
                found[f"{bucket}/{item['Key']}"] = ListedFile(int(item.get("Size") or 0), _object_version(item))
        if not page.get("IsTruncated"):
            return found
        request["ContinuationToken"] = page["NextContinuationToken"]


def list_folder(location: Location, directory: str) -> tuple[list[str], dict[str, ListedFile]]:
    """What `directory` holds directly: the paths of its folders (sorted) and its files, as find_files reports
    them (a local FIFO, broken link or the like with its problem). The top of a listing that the folders' own
    listings then share out."""
    def listing() -> tuple[list[str], dict[str, ListedFile]]:
        if location.is_local:
            return _local_entries(directory)
        try:
            entries = location.call("ls", directory, detail=True)
        except FileNotFoundError:
            return [], {}
        folders = sorted(info["name"].rstrip("/") for info in entries if info.get("type") == "directory")
        files = {info["name"]: ListedFile(int(info.get("size") or 0), _object_version(info)) for info in entries
                 if info.get("type") != "directory" and not info["name"].endswith("/")}
        return folders, files
    return _listed(listing, location.uri(directory))


def _listed(listing: Callable[[], T], where: str) -> T:
    """A listing with retries, its permission and credential failures as one line each."""
    try:
        return with_retries(listing, where)
    except PermissionError as exc:
        raise FruitpipeError(f"cannot list {where}: permission denied ({_first_line(exc)})") from None
    except Exception as exc:
        if any(type(error).__name__ == "NoCredentialsError" for error in _chain(exc)):
            raise FruitpipeError(f"cannot list {where}: no credentials found (set AWS_PROFILE or "
                                 "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run with an instance role)") from None
        raise


def _object_version(info: dict) -> str:
    """What an object store says changes on every rewrite: the ETag, else the last-modified time."""
    for key in ("ETag", "etag", "LastModified", "last_modified", "mtime", "updated"):
        if info.get(key):
            return str(info[key]).strip('"')
    return ""


def _local_files(root: str, above: tuple[str, ...] = ()) -> dict[str, ListedFile]:
    """Walk `root` (depth first, symlinks followed): regular files with their mtime, anything else with its problem.
    The folders in `above` count as above `root` for loops; with them, an unlistable `root` is reported."""
    try:
        top = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    if not stat.S_ISDIR(top.st_mode):
        return {}
    guarded = {(top.st_dev, top.st_ino)} | {(info.st_dev, info.st_ino) for info in map(os.stat, above)}
    found: dict[str, ListedFile] = {}
    # Each folder to list with the (device, inode) of the real folders above it: a link to one of them is a loop.
    folders: list[tuple[str, frozenset[tuple[int, int]]]] = [(root, frozenset(guarded))]
    while folders:
        folder, above_folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError as exc:
            if folder == root and not above:
                raise
            found[folder] = ListedFile(0, "", f"folder cannot be listed ({exc.strerror or exc})")
            continue
        for entry in listed:
            path = f"{folder}/{entry.name}"
            described = _entry(entry, above_folder)
            if isinstance(described, ListedFile):
                found[path] = described
            elif described is not None:
                folders.append((path, above_folder | {described}))
    return found


def _local_entries(directory: str) -> tuple[list[str], dict[str, ListedFile]]:
    """One local folder's entries: its folders (symlinks to folders included, loops to it reported) and files."""
    try:
        top = os.stat(directory)
        with os.scandir(directory) as entries:
            listed = list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return [], {}
    folders: list[str] = []
    files: dict[str, ListedFile] = {}
    for entry in listed:
        path = f"{directory}/{entry.name}"
        described = _entry(entry, frozenset({(top.st_dev, top.st_ino)}))
        if isinstance(described, ListedFile):
            files[path] = described
        elif described is not None:
            folders.append(path)
    return sorted(folders), files


def _entry(entry: os.DirEntry, above: frozenset[tuple[int, int]]) -> ListedFile | tuple[int, int] | None:
    """A directory entry as a file (with its problem, if any), a folder to descend (its device and inode), or None
    (deleted while listing)."""
    try:
        info = entry.stat()
    except FileNotFoundError:
        return ListedFile(0, "", "broken symbolic link (its target is missing)") if entry.is_symlink() else None
    except OSError as exc:
        return ListedFile(0, "", f"cannot be listed ({exc.strerror or exc})")
    if stat.S_ISDIR(info.st_mode):
        key = (info.st_dev, info.st_ino)
        if key in above:
            return ListedFile(0, "", "folder symlink loop: links to a folder above it (not followed)")
        return key
    if stat.S_ISREG(info.st_mode):
        return ListedFile(info.st_size, str(info.st_mtime_ns))
    return ListedFile(0, "", f"not a regular file ({_file_kind(info.st_mode)})")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), "special file")


def require_regular_file(location: Location, path: str) -> None:
    """Refuse, with one line, a path that is a folder, a FIFO, a socket or a device: reading one would fail or block
    forever. A missing path raises FileNotFoundError for the caller to word."""
    uri = location.uri(path)
    if location.is_local:
        mode = os.stat(path).st_mode
        folder, irregular = stat.S_ISDIR(mode), not stat.S_ISREG(mode)
    else:
        folder = irregular = with_retries(lambda: location.call("isdir", path), uri)
    if folder:
        raise FruitpipeError(f"{uri} is a folder, not an image file")
    if irregular:
        raise FruitpipeError(f"{uri} is not a regular file ({_file_kind(mode)}); give an image file")


def remove_tree(location: Location, path: str) -> None:
    """Delete `path` and everything below it, if present."""
    if exists(location, path):
        with_retries(lambda: location.call("rm", path, recursive=True), location.uri(path))


@contextlib.contextmanager
def unavailable_reported() -> Iterator[None]:
    """Re-raise, as its one line, an error of _REPORTED_FROM_TASKS that failed a Spark job's tasks (the store
    unreachable, no space left): Spark reports a task's exception only as text inside a JVM stack trace."""
    try:
        yield
    except FruitpipeError:
        raise
    except Exception as exc:
        found = _TASK_ERROR_LINE.search(str(exc))
        if found is None:
            raise
        error = next(kind for kind in _REPORTED_FROM_TASKS if kind.__name__ == found.group(1))
        raise error(found.group(2).strip()) from None
