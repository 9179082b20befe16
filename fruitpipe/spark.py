"""Everything that touches Spark: the session, and `SparkDistributor`, which runs the stages' tasks
(fruitpipe.stages) as Spark tasks: `parallelize(items).map(task)`, one task per item, large values broadcast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any, TypeVar

from fruitpipe.config import SPARK_ENGINE
from fruitpipe.errors import FruitpipeError

_LOCAL_MASTER = re.compile(r"^local(\[(\*|\d+)\])?$")
TASK_RETRIES = 4
MASTER_CONNECT_TIMEOUT_S = 10.0
DEFAULT_MASTER = "local[*]"

Item = TypeVar("Item")
Result = TypeVar("Result")


def local_master_cores(master: str) -> int | None:
    """The cores a local master (`local`, `local[N]`, `local[*]`) runs tasks on; None for any other master."""
    match = _LOCAL_MASTER.match(master)
    if not match:
        return None
    cores = match.group(2) or "1"
    return len(os.sched_getaffinity(0)) if cores == "*" else int(cores)


def effective_master(master: str) -> str:
    """`local[N]` gives a failed task no second try; give local runs Spark's usual retries (`local[N,F]`)."""
    match = _LOCAL_MASTER.match(master)
    if not match:
        return master
    cores = match.group(2) or "1"
    return f"local[{cores},{TASK_RETRIES}]"


# Settings of every session fruitpipe starts; the user's --spark-conf come after and win.
_SESSION_DEFAULTS = {
    "spark.ui.showConsoleProgress": "false",
    "spark.ui.enabled": "false",
    "spark.python.worker.reuse": "true",
    "spark.sql.shuffle.partitions": "8",
    "spark.task.maxFailures": str(TASK_RETRIES),
}
# Printed by Java 17+ at every start because Spark 4 always adds the module; no JVM option turns it off.
_JVM_NOISE = re.compile(r"^WARNING: Using incubator modules: ")
# `Exception in thread "main" org.apache.spark.SparkException: ` before the words a user needs.
_JAVA_EXCEPTION_PREFIX = re.compile(r'^(Exception in thread "[^"]*" )?([\w$]+\.)+[\w$]*(Exception|Error): ')
_GATEWAY_EXIT_WAIT_S = 5.0


class _JvmStderr:
    """The stderr of the Spark JVM this process launched (its Python workers' stderr comes through it too).

    Held while Spark starts, so a JVM that fails to start is explained in one line instead of Java's own lines;
    forwarded to our stderr while a session runs; muted once the session ends or Ctrl-C is pressed, because what
    a stopping JVM and its interrupted workers print is noise to a user who has been told what happened.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._held: list[str] = []
        self._state = "holding"
        read_fd, self.write_fd = os.pipe()
        self._pump_thread = threading.Thread(target=self._pump, args=(read_fd,), name="spark-jvm-stderr", daemon=True)
        self._pump_thread.start()

    def _pump(self, read_fd: int) -> None:
        with open(read_fd, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                with self._lock:
                    if self._state == "holding":
                        self._held.append(line)
                    elif self._state == "forwarding" and not _JVM_NOISE.match(line):
                        sys.stderr.write(line)
                        sys.stderr.flush()

    def hold(self) -> None:
        with self._lock:
            self._state, self._held = "holding", []

    def forward(self) -> None:
        with self._lock:
            self._state = "forwarding"
            sys.stderr.writelines(line for line in self._held if not _JVM_NOISE.match(line))
            self._held = []

    def mute(self) -> None:
        self._state = "muted"  # one assignment: safe inside a signal handler that interrupted the lock's holder

    def close_write_end(self) -> None:
        """Close this process's copy of the pipe's write end (the JVM holds its own), once, so the pump sees the end."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def exit_reason(self, close: bool = False) -> str | None:
        """After the JVM exited while starting: the first line it printed that says why, in words."""
        if close:
            self.close_write_end()
        self._pump_thread.join(_GATEWAY_EXIT_WAIT_S)
        with self._lock:
            lines = [line.strip() for line in self._held if line.strip() and not _JVM_NOISE.match(line)]
            self._state, self._held = "muted", []
        return _JAVA_EXCEPTION_PREFIX.sub("", lines[0]) if lines else None


# The stderr of the JVM launched by this process (it lives as long as the process: PySpark keeps its gateway).
_jvm_stderr: _JvmStderr | None = None


class _WithoutPy4j(logging.Filter):
    """Drops what py4j logs: it logs a lost or interrupted JVM call with a traceback, on the root logger too, and
    fruitpipe reports the failure itself in one line."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.startswith(self.directory)


def _silence_py4j() -> None:
    import py4j

    logging.getLogger("py4j").setLevel(logging.CRITICAL + 1)
    root = logging.getLogger()
    if not any(isinstance(existing, _WithoutPy4j) for existing in root.filters):
        root.addFilter(_WithoutPy4j(os.path.dirname(py4j.__file__)))


def _mute_jvm() -> None:
    if _jvm_stderr is not None:
        _jvm_stderr.mute()


@contextlib.contextmanager
def spark_session(master: str | None, conf: dict[str, str], app_name: str = "fruitpipe") -> Iterator:
    """Reuse the active SparkSession or start one; stop only a session this call started.

    With no master given, a driver that spark-submit started keeps the master spark-submit was given (it set
    PYSPARK_GATEWAY_PORT); any other process runs local[*]. While a session this call started runs, Ctrl-C raises
    KeyboardInterrupt at once (PySpark's own handler calls into the JVM from inside the interrupted JVM call and
    fails with a Py4J traceback); a session that fails to start is one FruitpipeError line.
    """
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    if master is None and "PYSPARK_GATEWAY_PORT" not in os.environ:
        master = DEFAULT_MASTER
    if master is not None:
        check_master_reachable(master)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        session = _start_session(master, conf, app_name)
        try:
            yield session
        except BaseException as exc:
            _mute_jvm()
            with contextlib.suppress(Exception):  # the error that ended the run is the one to report
                session.stop()
            if not isinstance(exc, KeyboardInterrupt) and _during_ctrl_c(exc):
                raise KeyboardInterrupt from None
            raise
        _mute_jvm()  # a stopping JVM's messages are not the user's business
        session.stop()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_handler)


def _start_session(master: str | None, conf: dict[str, str], app_name: str):
    """A new SparkSession (and the JVM, unless one runs already), or one FruitpipeError line saying why not."""
    global _jvm_stderr
    from pyspark import SparkConf, SparkContext
    from pyspark.java_gateway import launch_gateway
    from pyspark.sql import SparkSession

    _silence_py4j()
    log_config = resources.files("fruitpipe").joinpath("log4j2.properties")
    java_options = f"-Dlog4j2.configurationFile=file:{log_config}"
    settings = (SparkConf().setAppName(app_name).setAll(_SESSION_DEFAULTS.items())
                .set("spark.driver.extraJavaOptions", java_options).set("spark.executor.extraJavaOptions", java_options)
                .setAll((key, str(value)) for key, value in conf.items()))
    if master is not None:
        settings.setMaster(effective_master(master))
    failed = f"cannot start Spark with master {master or 'given to spark-submit'}"
    gateway = None
    if SparkContext._gateway is None and "PYSPARK_GATEWAY_PORT" not in os.environ:
        stderr = _JvmStderr()
        try:
            with _ctrl_c_deferred() as interrupted:
                gateway = launch_gateway(settings, popen_kwargs={"stderr": stderr.write_fd})
        except Exception as exc:
            raise FruitpipeError(f"{failed}: {stderr.exit_reason(close=True) or _first_line(exc)}") from None
        finally:
            stderr.close_write_end()
        if interrupted:
            stderr.mute()
            gateway.proc.stdin.close()  # the gateway JVM exits when its stdin closes
            raise KeyboardInterrupt
        _jvm_stderr = stderr
    elif _jvm_stderr is not None:
        _jvm_stderr.hold()
    try:
        context = SparkContext(conf=settings, gateway=gateway) if gateway else SparkContext.getOrCreate(settings)
    except Exception as exc:
        _mute_jvm()
        raise FruitpipeError(f"{failed}: {_java_reason(exc)}") from None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _interrupted)  # replaces PySpark's, installed by SparkContext
    try:
        session = SparkSession.builder.getOrCreate()
    except Exception as exc:
        _mute_jvm()
        with contextlib.suppress(Exception):
            context.stop()
        raise FruitpipeError(f"{failed}: {_java_reason(exc)}") from None
    session.sparkContext.setLogLevel("ERROR")
    if _jvm_stderr is not None:
        _jvm_stderr.forward()
    return session


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[list[int]]:
    """Hold a first Ctrl-C until the block ends (the yielded list then holds its signal): the JVM that PySpark is
    launching would survive an interrupted launch for good, holding the terminal. A second Ctrl-C interrupts."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def defer(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = signal.signal(signal.SIGINT, defer)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C during a session: stop here, touching nothing of the JVM; the session is stopped on the way out."""
    _mute_jvm()
    raise KeyboardInterrupt


def _during_ctrl_c(exc: BaseException) -> bool:
    """True when `exc` was raised while PySpark unwound from Ctrl-C: its exits call into the JVM, whose connection
    the interrupt broke, and the Py4J error that follows hides the KeyboardInterrupt."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _java_reason(exc: BaseException) -> str:
    """The words of a JVM-side failure (`java.lang.X: why` inside a Py4J error), else the error's first line."""
    java_exception = getattr(exc, "java_exception", None)
    if java_exception is not None:
        with contextlib.suppress(Exception):
            return _JAVA_EXCEPTION_PREFIX.sub("", str(java_exception).strip().splitlines()[0])
    return _first_line(exc)


def check_master_reachable(master: str, timeout_s: float = MASTER_CONNECT_TIMEOUT_S) -> None:
    """Fail fast when no standalone master listens at `spark://host:port[,host:port]`.

    Spark itself retries registering for over a minute and then reports a stopped SparkContext.
    """
    if not master.startswith("spark://"):
        return
    problems = []
    for address in master[len("spark://"):].split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
                return
        except ValueError:
            problems.append(f"{address}: not host:port")
        except OSError as exc:
            problems.append(f"{address}: {exc.strerror or exc}")
    raise FruitpipeError(f"cannot reach Spark master {master} ({'; '.join(problems)}); "
                         "is the master running and the URL right?")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class SparkDistributor:
    """The stages' tasks on a Spark session (fruitpipe.distributors.Distributor): one Spark task per item."""

    engine = SPARK_ENGINE

    def __init__(self, session) -> None:
        self.context = session.sparkContext
        self.master = str(self.context.master)
        self.slots = max(1, int(self.context.defaultParallelism))

    def map(self, task: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
        if not items:
            return []
        return self.context.parallelize(list(items), numSlices=len(items)).map(task).collect()

    @contextlib.contextmanager
    def shared(self, value: Any) -> Iterator[Callable[[], Any]]:
        broadcast = self.context.broadcast(value)
        try:
            yield _BroadcastValue(broadcast)
        finally:
            broadcast.unpersist()

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine, "master": self.master}


class _BroadcastValue:
    """A getter of a broadcast's value, in a Spark task (the broadcast pickles as its id)."""

    def __init__(self, broadcast) -> None:
        self.broadcast = broadcast

    def __call__(self) -> Any:
        return self.broadcast.value
