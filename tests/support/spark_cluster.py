"""A real Spark standalone cluster on loopback (one master, N workers), started from pyspark's own launcher.

    with SparkCluster(tmp_path / "cluster", workers=2) as cluster:
        subprocess.run(["fruitpipe", "run", src, out, "--master", cluster.master_url])
        cluster.executor_dirs()                   # {worker index: [executor work dirs]}

Every daemon runs in its own process group, so stopping the cluster also ends the executors (and their Python
workers) that the worker daemons launched, including when a test fails half-way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pyspark

from tests.support.moto_server import free_port

HOST = "127.0.0.1"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


def spark_class() -> Path:
    """pyspark's `bin/spark-class`, which starts any Spark JVM class with the bundled jars."""
    return Path(pyspark.__file__).parent / "bin" / "spark-class"


class SparkCluster:
    """A standalone master and `workers` workers on 127.0.0.1, each worker with `cores` cores and `memory`."""

    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "1g",
                 env: Mapping[str, str] | None = None, start_timeout_s: float = 90.0) -> None:
        self.root = Path(root)
        self.workers = workers
        self.cores = cores
        self.memory = memory
        self.extra_env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.master_port = free_port(HOST)
        self.webui_port = free_port(HOST)
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    @property
    def master_url(self) -> str:
        return f"spark://{HOST}:{self.master_port}"

    @property
    def webui_url(self) -> str:
        return f"http://{HOST}:{self.webui_port}"

    @property
    def processes(self) -> list[subprocess.Popen[bytes]]:
        """The daemons started so far (master first)."""
        return [process for _, process in self._processes]

    def worker_dir(self, index: int) -> Path:
        return self.root / f"worker-{index}"

    def __enter__(self) -> SparkCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Start the master, then the workers; return once every worker is registered and alive."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._launch("master", [MASTER_CLASS, "--host", HOST, "--port", str(self.master_port),
                                "--webui-port", str(self.webui_port)])
        self._wait(lambda state: state is not None, "the master to answer")
        for index in range(self.workers):
            work_dir = self.worker_dir(index)
            work_dir.mkdir(parents=True, exist_ok=True)
            self._launch(f"worker-{index}", [WORKER_CLASS, "--host", HOST, "--port", str(free_port(HOST)),
                                             "--webui-port", str(free_port(HOST)), "--cores", str(self.cores),
                                             "--memory", self.memory, "--work-dir", str(work_dir),
                                             self.master_url])
        self._wait(lambda state: state is not None and self._alive_workers(state) == self.workers,
                   f"{self.workers} workers to register")

    def state(self) -> dict[str, Any] | None:
        """The master's JSON status (workers, applications), or None while it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.webui_url}/json/", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            return None

    def executor_dirs(self) -> dict[int, list[Path]]:
        """Executor work dirs (`<worker dir>/<app id>/<executor id>`) per worker index."""
        return {index: sorted(path for path in self.worker_dir(index).glob("app-*/*") if path.is_dir())
                for index in range(self.workers)}

    def logs(self) -> str:
        """Every daemon's and executor's log, for failure messages and secret scans."""
        files = sorted(self.root.glob("*.log")) + sorted(self.root.glob("worker-*/app-*/*/std*"))
        return "\n".join(f"==> {path} <==\n{path.read_text(errors='replace')}" for path in files)

    def stop(self) -> None:
        """End every process this cluster started: workers (with their executors) first, then the master."""
        for _, process in reversed(self._processes):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, process in reversed(self._processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)
            process.wait()
        self._processes.clear()

    def _launch(self, name: str, arguments: list[str]) -> None:
        env = {**os.environ, **self.extra_env, "SPARK_LOCAL_IP": HOST, "SPARK_LOCAL_HOSTNAME": "localhost",
               "SPARK_NO_DAEMONIZE": "1", "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON", sys.executable)}
        env.pop("SPARK_HOME", None)
        with open(self.root / f"{name}.log", "wb") as log:
            process = subprocess.Popen([str(spark_class()), *arguments], stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, cwd=self.root, start_new_session=True)
        self._processes.append((name, process))

    def _wait(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for name, process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"spark {name} exited with {process.returncode}:\n{self.logs()[-4000:]}")
            if ready(self.state()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {self.start_timeout_s:g} s waiting for {what}:\n{self.logs()[-4000:]}")

    @staticmethod
    def _alive_workers(state: dict[str, Any]) -> int:
        return sum(worker.get("state") == "ALIVE" for worker in state.get("workers", []))


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
