"""A moto server on loopback, so AWS code is tested over real HTTP without ever reaching AWS.

    with MotoServer() as moto:
        s3 = moto.client("s3")                    # boto3 client with dummy credentials
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        for name, value in moto.env().items():    # or hand these to a subprocess
            monkeypatch.setenv(name, value)

One server serves every service (S3, EMR, IAM, STS, EC2, ...) at ``moto.url``. Starting one and each
service's first request take a second or more, so share a server (e.g. a module-scoped fixture) and keep
tests apart with unique bucket and resource names.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import TracebackType
from typing import Any

DUMMY_ACCESS_KEY = "testing"
DUMMY_SECRET_KEY = "testing"


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class MotoServer:
    """Runs ``python -m moto.server`` as a child process for the duration of a ``with`` block."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None, start_timeout_s: float = 30.0,
                 load_managed_policies: bool = True) -> None:
        """``load_managed_policies`` makes AWS-managed IAM policies attachable, as they are on AWS."""
        self.host = host
        self.load_managed_policies = load_managed_policies
        self.port = port or free_port(host)
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._session: Any = None
        self._clients: dict[tuple[str, str], Any] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Starts the server and returns once it answers HTTP; raises with its log if it never does."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self.load_managed_policies:
            env["MOTO_IAM_LOAD_MANAGED_POLICIES"] = "true"
        self._log = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._process.returncode}:\n{self._read_log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto_server did not answer on {self.url} within {self.start_timeout_s} s:\n"
                           f"{self._read_log()}")

    def stop(self) -> None:
        """Stops the server (politely, then firmly)."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._log.close()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped with SIGSTOP for the block: connections are accepted by the kernel, never answered."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self._process.pid, signal.SIGCONT)

    def env(self, region: str = "eu-west-1", access_key: str = DUMMY_ACCESS_KEY,
            secret_key: str = DUMMY_SECRET_KEY) -> dict[str, str]:
        """Environment variables that point boto3, the AWS CLI and s3fs at this server with dummy credentials.

        The config and credential files point at nothing, so a developer's own profiles are never read;
        remove ``AWS_PROFILE`` from the environment as well.
        """
        nowhere = os.path.join(tempfile.gettempdir(), "fruitpipe-no-aws-config")
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_DEFAULT_REGION": region,
            "AWS_REGION": region,
            "AWS_CONFIG_FILE": nowhere,
            "AWS_SHARED_CREDENTIALS_FILE": nowhere,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, service: str, region: str = "eu-west-1") -> Any:
        """A boto3 client for ``service`` on this server, independent of the process environment.

        Clients are cached and share one session, because building one costs tenths of a second.
        """
        import boto3

        if self._session is None:
            self._session = boto3.session.Session(aws_access_key_id=DUMMY_ACCESS_KEY,
                                                  aws_secret_access_key=DUMMY_SECRET_KEY)
        key = (service, region)
        if key not in self._clients:
            self._clients[key] = self._session.client(service, region_name=region, endpoint_url=self.url)
        return self._clients[key]

    def _read_log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]
