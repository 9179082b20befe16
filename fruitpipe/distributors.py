"""Where a run's tasks run: one `Distributor` signature for Spark and for a process pool on this machine
(img2dataset's pattern), so fruitpipe.stages is written once.

- spark (`fruitpipe.spark.SparkDistributor`): any master, a laptop to a cluster; Spark retries failed tasks.
- local (`LocalDistributor`): a process pool for small runs on one machine: no JVM, no Spark jobs. Its workers
  are forked from a server that imported the extraction code once, are reused by the three stages and keep their
  runtime session (fruitpipe.inference) from shard to shard; they ignore Ctrl-C (the driver stops them) and die
  with the driver. A failed task is tried again up to TASK_RETRIES times in all, as fruitpipe's Spark sessions do.
- driver (`DriverDistributor`): the tasks in the driver process; the PCA stages of a small run use it whatever the
  engine (a Spark job costs more than the Gram matrix of a few thousand rows).

A run's `engine` (RunConfig: YAML `engine:`, keyword `engine=`) is spark, local or auto. auto (the default) picks
local when the master is local (none given, or local[N] / local[*]), no Spark setting is given and the run lists at
most LOCAL_MAX_IMAGES images; spark otherwise. The environment variable FRUITPIPE_ENGINE=spark|local replaces
auto's choice (the test suite sets spark: its Spark tests stay on Spark).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol, TypeVar

from fruitpipe.config import AUTO_ENGINE, ENGINES, LOCAL_ENGINE, SPARK_ENGINE, RunConfig
from fruitpipe.errors import FruitpipeError
from fruitpipe.spark import DEFAULT_MASTER, TASK_RETRIES, SparkDistributor, local_master_cores, spark_session

ENGINE_ENV = "FRUITPIPE_ENGINE"
# auto's limit for the local engine. Both engines run the same tasks in as many processes, so per image they are
# equally fast; the pool saves Spark's fixed cost (JVM, session, workers importing, jobs), measured on the 2-core
# machine as 6-10 CPU seconds per run (mini, 300 images: 7.7-11.7 s of CPU on the pool, 18.0-20.1 s on Spark;
# the 600-image demo: 11.6-14.5 s against 17.3-18.8 s). Beyond this many images (~100 s at ~100 img/s on 2
# cores) that is under a tenth of the run, and larger runs keep Spark, the engine a cluster runs.
LOCAL_MAX_IMAGES = 10_000
# The PCA stages run in the driver up to this many images with features: their Gram matrix takes 0.43 CPU seconds
# there (10,000 x 1280 float32 rows, one core), about what one Spark job costs to schedule (0.7-1.4 s measured).
DRIVER_PCA_MAX_IMAGES = 10_000
# What the local pool's server imports once, before it forks the workers: the tasks' code, pyspark (extract asks
# it for the task attempt) and pandas (pyarrow imports it at a worker's first Table.from_pylist: 0.22-0.25 CPU s).
_PRELOADED = ("fruitpipe.stages", "fruitpipe.planning", "pyspark", "pandas")
# How often a pool worker checks that the driver still runs, where no pidfd can wait for it (not Linux).
DRIVER_POLL_S = 1.0

Item = TypeVar("Item")
Result = TypeVar("Result")


class Distributor(Protocol):
    """Runs a task on every item, in parallel where it can, and returns the results in the items' order.

    Tasks and items must be picklable (module-level functions, functools.partial of them); `shared` hands a large
    read-only value to the tasks as a getter, sent once per worker instead of once per task.
    """

    engine: str
    slots: int

    def map(self, task: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]: ...

    def shared(self, value: Any) -> contextlib.AbstractContextManager[Callable[[], Any]]: ...

    def info(self) -> dict[str, Any]:
        """What ran the tasks, for model_info."""
        ...


def choose_engine(config: RunConfig, listed_images: int) -> str:
    """The engine of this run: the configured one, or auto's choice (FRUITPIPE_ENGINE, else by master and size)."""
    engine = config.engine if config.engine != AUTO_ENGINE else os.environ.get(ENGINE_ENV, AUTO_ENGINE)
    if engine not in ENGINES:
        raise FruitpipeError(f"{ENGINE_ENV} must be one of {', '.join(e for e in ENGINES if e != AUTO_ENGINE)}, "
                             f"got {engine!r}")
    master = _master(config)
    local_master = master is not None and local_master_cores(master) is not None
    if engine == LOCAL_ENGINE and not local_master:
        raise FruitpipeError(f"the local engine runs on this machine only, not on master "
                             f"{master or 'given to spark-submit'}: drop --master or use engine spark")
    if engine != AUTO_ENGINE:
        return engine
    small = listed_images <= LOCAL_MAX_IMAGES
    return LOCAL_ENGINE if local_master and small and not config.spark_conf else SPARK_ENGINE


def engine_before_listing(config: RunConfig) -> str | None:
    """The run's engine when its size cannot change it (configured, or a cluster), else None: then the listing,
    which tells the size, runs in the local pool (the master is local) and auto chooses after it."""
    small, large = choose_engine(config, 0), choose_engine(config, LOCAL_MAX_IMAGES + 1)
    return small if small == large else None


def _master(config: RunConfig) -> str | None:
    """The master the run would use; None for the one spark-submit gave this process (never a local pool)."""
    if config.master is not None:
        return config.master.strip()
    return DEFAULT_MASTER if "PYSPARK_GATEWAY_PORT" not in os.environ else None


@contextlib.contextmanager
def open_distributor(engine: str, config: RunConfig, tasks: int) -> Iterator[Distributor]:
    """The run's distributor for its lifetime: a Spark session (reused or started) or a local pool of at most
    `tasks` workers, stopped on the way out (at once on an error or Ctrl-C)."""
    if engine == SPARK_ENGINE:
        with spark_session(config.master, spark_settings(config)) as session:
            yield SparkDistributor(session)
        return
    cores = local_master_cores(_master(config) or DEFAULT_MASTER) or 1
    workers = max(1, min(tasks, cores // config.threads_per_task))
    with LocalDistributor(workers) as distributor:
        yield distributor


def spark_settings(config: RunConfig) -> dict[str, str]:
    """The run's Spark settings: a task takes as many cores as its runtime has threads (spark.task.cpus), so that
    tasks x threads stay within every executor's cores, on a laptop, a cluster or EMR alike; the user's
    --spark-conf comes last and wins."""
    layout = {"spark.task.cpus": str(config.threads_per_task)} if config.threads_per_task > 1 else {}
    return {**layout, **config.spark_conf}


def prepare(config: RunConfig) -> None:
    """Start the local pool's fork server now when this run may use the local engine (its size is not known yet),
    so the server's imports (0.6 s measured on 2 cores) overlap the driver's model export. A run that turns out
    large leaves it unused."""
    if choose_engine(config, 0) == LOCAL_ENGINE:
        _start_pool_server()


class _WorkerProcess(multiprocessing.context.ForkServerProcess):
    """A pool worker that does not import the driver's __main__ (multiprocessing's default): its tasks live in
    importable modules, and a user's script run again in every worker would repeat whatever it does at the top
    level, a run without an `if __name__ == "__main__"` guard included."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        main = sys.modules["__main__"]
        hidden = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
        main.__spec__ = None
        main.__dict__.pop("__file__", None)
        try:
            return multiprocessing.context.ForkServerProcess._Popen(process_obj)
        finally:
            main.__dict__.update(hidden)


class _PoolContext(multiprocessing.context.ForkServerContext):
    Process = _WorkerProcess


def _start_pool_server() -> multiprocessing.context.BaseContext:
    """The context of the local pool: its fork server, started once per process, imports _PRELOADED before it
    forks a worker; ensure_running returns at once (the server imports on its own)."""
    from multiprocessing import forkserver

    context = _PoolContext()
    context.set_forkserver_preload(list(_PRELOADED))
    forkserver.ensure_running()
    return context


def for_pca(distributor: Distributor, images: int) -> Distributor:
    """Where the PCA stages of a run with `images` feature rows run: the driver when they are few."""
    return DriverDistributor() if images <= DRIVER_PCA_MAX_IMAGES else distributor


class DriverDistributor:
    """Every task in this process, one after the other."""

    engine = "driver"
    slots = 1

    def map(self, task: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
        return [task(item) for item in items]

    @contextlib.contextmanager
    def shared(self, value: Any) -> Iterator[Callable[[], Any]]:
        yield lambda: value

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine}


class _SharedFile:
    """A getter for a value the driver pickled to a file: what crosses to the workers is its path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self) -> Any:
        with open(self.path, "rb") as handle:
            return pickle.load(handle)


class LocalDistributor:
    """A pool of `workers` processes on this machine, kept for the distributor's lifetime (use it as a context
    manager: leaving it normally waits for the workers to exit, leaving it on an error or Ctrl-C kills them)."""

    engine = LOCAL_ENGINE

    def __init__(self, workers: int) -> None:
        self.slots = workers
        self._context = _start_pool_server()
        self._executor: ProcessPoolExecutor | None = None
        self._shared_dir: str | None = None

    def __enter__(self) -> LocalDistributor:
        self._shared_dir = tempfile.mkdtemp(prefix="fruitpipe-shared-")
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        self._stop(kill=kind is not None)
        if self._shared_dir is not None:
            shutil.rmtree(self._shared_dir, ignore_errors=True)

    def info(self) -> dict[str, Any]:
        return {"engine": self.engine, "workers": self.slots}

    @contextlib.contextmanager
    def shared(self, value: Any) -> Iterator[Callable[[], Any]]:
        assert self._shared_dir is not None, "use LocalDistributor as a context manager"
        handle, path = tempfile.mkstemp(dir=self._shared_dir, suffix=".pickle")
        with os.fdopen(handle, "wb") as file:
            pickle.dump(value, file, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            yield _SharedFile(path)
        finally:
            os.remove(path)

    def map(self, task: Callable[[Item], Result], items: Sequence[Item]) -> list[Result]:
        """Every item's result; a task that fails is submitted again until it failed TASK_RETRIES times, and then
        its error is raised here (a worker that died breaks the pool: it is rebuilt and its tasks count a failure)."""
        results: list[Any] = [None] * len(items)
        failures = [0] * len(items)
        running: dict[Future, tuple[int, ProcessPoolExecutor]] = {}

        def submit(index: int) -> None:
            pool = self._pool()
            running[pool.submit(task, items[index])] = index, pool

        for index in range(len(items)):
            submit(index)
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index, pool = running.pop(future)
                try:
                    results[index] = future.result()
                    continue
                except Exception as exc:
                    if isinstance(exc, BrokenProcessPool) and pool is self._executor:
                        self._stop(kill=True)
                    failures[index] += 1
                    if failures[index] >= TASK_RETRIES:
                        raise
                submit(index)
        return results

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(self.slots, mp_context=self._context, initializer=_worker_started,
                                                 initargs=(os.getpid(),))
        return self._executor

    def _stop(self, kill: bool) -> None:
        """Shut the pool down; with `kill`, end its workers now instead of letting them finish their tasks."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # ProcessPoolExecutor has no public way to end running workers before Python 3.14 (kill_workers).
        workers = list((executor._processes or {}).values()) if kill else []
        for worker in workers:
            worker.kill()
        executor.shutdown(wait=True, cancel_futures=True)


def _worker_started(driver_pid: int) -> None:
    """A pool worker ignores Ctrl-C (the driver, which gets it too, kills the pool) and ends when the driver ends,
    however it ends: no worker writes on after its run is gone. (Its parent is the fork server, which outlives
    the driver as long as a worker does, so a parent-death signal would not do.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(driver_pid,), name="fruitpipe-driver-watch", daemon=True).start()


def _exit_with(driver_pid: int) -> None:
    """Wait for the driver process to end (a pidfd on Linux, else polling), then end this process at once."""
    if hasattr(os, "pidfd_open"):
        try:
            select.select([os.pidfd_open(driver_pid)], [], [])
        except ProcessLookupError:
            pass
    else:
        while _running(driver_pid):
            time.sleep(DRIVER_POLL_S)
    os._exit(1)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
