"""Everything that touches Spark: the session, and the three distributed stages of a run.

1. extract: one partition per shard, image rows streamed into `mapInPandas` as Arrow batches; each task
   decodes, runs ONNX Runtime (model bytes from a broadcast) and writes its shard whole.
2. gram: each task reads some feature shards and returns their PCA sufficient statistics.
3. project: each task reads a feature shard and writes its PCA shard.
Features are materialised by stage 1, so the CNN runs once per image however many actions follow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from importlib import resources

import numpy as np
import pandas as pd

from fruitpipe import sinks
from fruitpipe.errors import FruitpipeError
from fruitpipe.extract import IMAGE_COLUMNS, IMAGE_SCHEMA, ExtractionSettings, process_shard, shard_records
from fruitpipe.pca import GramStatistics, PcaModel
from fruitpipe.storage import locate

_LOCAL_MASTER = re.compile(r"^local(\[(\*|\d+)\])?$")
STATS_SCHEMA = "shard_id long, stats string"
TASK_RETRIES = 4
MASTER_CONNECT_TIMEOUT_S = 10.0
DEFAULT_MASTER = "local[*]"


def effective_master(master: str) -> str:
    """`local[N]` gives a failed task no second try; give local runs Spark's usual retries (`local[N,F]`)."""
    match = _LOCAL_MASTER.match(master)
    if not match:
        return master
    cores = match.group(2) or "1"
    return f"local[{cores},{TASK_RETRIES}]"


@contextlib.contextmanager
def spark_session(master: str | None, conf: dict[str, str], app_name: str = "fruitpipe") -> Iterator:
    """Reuse the active SparkSession or start one; stop only a session this call started.

    With no master given, a driver that spark-submit started keeps the master spark-submit was given (it set
    PYSPARK_GATEWAY_PORT); any other process runs local[*].
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
    log_config = resources.files("fruitpipe").joinpath("log4j2.properties")
    builder = (SparkSession.builder.appName(app_name)
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.ui.enabled", "false")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", "256")
               .config("spark.python.worker.reuse", "true")
               .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log_config}")
               .config("spark.executor.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log_config}")
               .config("spark.sql.shuffle.partitions", "8")
               .config("spark.task.maxFailures", str(TASK_RETRIES)))
    if master is not None:
        builder = builder.master(effective_master(master))
    for key, value in conf.items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:
        raise FruitpipeError(f"cannot start Spark with master {master or 'given to spark-submit'}: "
                             f"{_first_line(exc)}") from None
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()


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


def task_slots(spark) -> int:
    return max(1, int(spark.sparkContext.defaultParallelism))


def run_extraction(spark, shards: dict[int, list[dict]], settings: ExtractionSettings, onnx_bytes: bytes) -> list[dict]:
    """Stage 1: process the given shards (one Spark partition each); returns their stats."""
    if not shards:
        return []
    context = spark.sparkContext
    model_broadcast = context.broadcast(onnx_bytes)
    shard_ids = sorted(shards)
    rows = context.parallelize([shards[i] for i in shard_ids], numSlices=len(shard_ids)).flatMap(lambda rows: rows)
    images = spark.createDataFrame(rows.map(lambda r: tuple(r[c] for c in IMAGE_COLUMNS)),
                                   schema=IMAGE_SCHEMA)

    def extract_partition(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for shard_id, records in shard_records(batches).items():
            stats = process_shard(shard_id, records, settings, lambda: model_broadcast.value)
            yield pd.DataFrame({"shard_id": [shard_id], "stats": [json.dumps(stats)]})

    try:
        collected = images.mapInPandas(extract_partition, schema=STATS_SCHEMA).collect()
    finally:
        model_broadcast.unpersist()
    return [json.loads(row["stats"]) for row in collected]


def run_gram(spark, output: str, shard_ids: list[int], shift: np.ndarray) -> GramStatistics:
    """Stage 2: PCA sufficient statistics over every feature shard, summed on the driver."""
    partitions = min(len(shard_ids), task_slots(spark))

    def gram_partition(ids: Iterator[int]) -> Iterator[GramStatistics]:
        out = locate(output)
        statistics = GramStatistics.empty(shift)
        for shard_id in ids:
            table = sinks.read_parquet(out, sinks.FEATURES, sinks.part_name(shard_id))
            statistics.update(sinks.vectors_matrix(table, "features"))
        yield statistics

    total = GramStatistics.empty(shift)
    for partial in spark.sparkContext.parallelize(shard_ids, numSlices=partitions).mapPartitions(gram_partition).collect():
        total.merge(partial)
    return total


def run_projection(spark, output: str, shard_ids: list[int], model: PcaModel) -> int:
    """Stage 3: write pca/part-N for every feature shard; returns the number of rows projected."""
    model_broadcast = spark.sparkContext.broadcast(model)

    def project(shard_id: int) -> int:
        out = locate(output)
        table = sinks.read_parquet(out, sinks.FEATURES, sinks.part_name(shard_id))
        projected = model_broadcast.value.transform(sinks.vectors_matrix(table, "features"))
        keys = table.drop_columns(["features"]).to_pandas()
        sinks.write_parquet(out, sinks.PCA, sinks.part_name(shard_id), sinks.vectors_table(keys, "pca", projected))
        return table.num_rows

    try:
        return sum(spark.sparkContext.parallelize(shard_ids, numSlices=len(shard_ids) or 1).map(project).collect())
    finally:
        model_broadcast.unpersist()
