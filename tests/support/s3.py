"""S3 test helpers: one bucket on a moto server, the process environment a user's shell would have, and plain
boto3 reads of what a run wrote. The fixtures built on them (`moto`, `s3_process_env`) are in tests/conftest.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tests.support.moto_server import MotoServer

BUCKET = "fruitpipe-test"
# Recognisable dummies: a test greps every output object and every captured line for them.
ACCESS_KEY = "AKIAFRUITPIPE7TEST42"
SECRET_KEY = "fruitpipeTestSecret/4f8e+Zq93kLm0Wx"


def s3_environment(moto: MotoServer, **overrides: str) -> dict[str, str]:
    """The process environment pointed at `moto` through the standard AWS variables only, without Spark's Python
    settings, so a `fruitpipe` subprocess resolves both exactly as a user's shell would."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("AWS_") and key not in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    env.update(moto.env(access_key=ACCESS_KEY, secret_key=SECRET_KEY))
    env.update(overrides)
    return env


def create_bucket(moto: MotoServer, bucket: str = BUCKET) -> Any:
    client = moto.client("s3")
    client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    return client


def upload_tree(client: Any, root: Path, bucket: str, prefix: str) -> int:
    """Every file under `root` as `prefix/<relative path>`, uploaded concurrently; returns the file count."""
    files = [path for path in sorted(root.rglob("*")) if path.is_file()]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda path: client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}",
                                                     Body=path.read_bytes()), files))
    return len(files)


def object_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return sorted(keys)


def read_object(client: Any, bucket: str, key: str) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def read_parquet_dir(client: Any, bucket: str, prefix: str) -> pd.DataFrame:
    keys = [key for key in object_keys(client, bucket, prefix) if key.endswith(".parquet")]
    return pa.concat_tables([pq.read_table(io.BytesIO(read_object(client, bucket, key))) for key in keys]).to_pandas()


def fruitpipe_command(arguments: list[str], env: Mapping[str, str], timeout_s: float = 600,
                      ) -> subprocess.CompletedProcess[str]:
    """The `fruitpipe` command in a fresh process (its own Spark driver, separate from the tests' session)."""
    return subprocess.run([sys.executable, "-m", "fruitpipe.cli", *arguments], env=dict(env), capture_output=True,
                          text=True, timeout=timeout_s)
