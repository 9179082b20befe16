"""A moto S3 server on loopback for the benchmarks: its own process (so its CPU is not the benchmark's), or the
benchmark's own (InProcessMotoS3, to fill it without PUTs), dummy credentials, and nothing read from the developer's
AWS profiles. Benchmarks do not import the tests."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

ACCESS_KEY = SECRET_KEY = "testing"
REGION = "eu-west-1"


class MotoS3:
    """`python -m moto.server` on 127.0.0.1 for the duration of a `with` block."""

    def __init__(self, start_timeout_s: float = 30.0) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> MotoS3:
        env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
        self._process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + self.start_timeout_s
        while self._process.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1):
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"moto_server did not answer on {self.url} within {self.start_timeout_s:g} s "
                           "(is the `moto[server]` extra installed?)")

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def env(self) -> dict[str, str]:
        """AWS variables pointing boto3 and s3fs at this server with dummy credentials and no config files."""
        nowhere = os.path.join(tempfile.gettempdir(), "fruitpipe-no-aws-config")
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, "AWS_CONFIG_FILE": nowhere,
                "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, region_name=REGION, endpoint_url=self.url, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY)


class InProcessMotoS3(MotoS3):
    """The same server in this process (moto's ThreadedMotoServer), so a benchmark can fill its backend directly:
    a million keys in seconds rather than a million PUTs. Its CPU and memory are then this process's."""

    def __enter__(self) -> InProcessMotoS3:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request on the benchmark's output
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        server, self._server = getattr(self, "_server", None), None
        if server is not None:
            server.stop()
            self.backend().reset()

    def backend(self) -> Any:
        """moto's S3 backend that this server answers from (the default account, partition aws)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
