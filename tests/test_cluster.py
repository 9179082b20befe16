"""The same run on a real Spark standalone cluster (one master, two workers, all on 127.0.0.1).

The driver is the `fruitpipe` command in its own process, as a user would start it with `--master spark://…`;
the executors are JVMs the workers launch, each with its own Python workers. The result must equal the shared
`local[*]` run (conftest's finished_run), and both workers' executors must have processed shards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.support.spark_cluster import HOST, SparkCluster
from tests.support.compare import assert_pca_equal, vectors

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster_run(demo_root, cache_dir, tmp_path_factory):
    """`fruitpipe run` against the cluster, with the shared local run's settings; yields (cluster, OUT, process)."""
    root = tmp_path_factory.mktemp("cluster")
    with SparkCluster(root / "spark", workers=2, cores=1, memory="1g") as cluster:
        output = root / "run"
        yield cluster, output, _run_on_cluster(cluster, demo_root, output, cache_dir)


def _run_on_cluster(cluster: SparkCluster, source: Path, output: Path, cache_dir: str) -> subprocess.CompletedProcess:
    """`fruitpipe run SOURCE OUTPUT` in its own process with the cluster as master and the shared run's settings."""
    # Wait for both executors before scheduling, so the shards spread over the two workers.
    conf = {"spark.executor.memory": "512m", "spark.executor.cores": "1", "spark.cores.max": "2",
            "spark.scheduler.minRegisteredResourcesRatio": "1.0",
            "spark.scheduler.maxRegisteredResourcesWaitingTime": "120s", "spark.driver.host": HOST}
    arguments = ["run", str(source), str(output), "--master", cluster.master_url, "--pca-k", "10",
                 "--shard-size", "20", "--cache-dir", cache_dir]
    for key, value in conf.items():
        arguments += ["--spark-conf", f"{key}={value}"]
    env = {**os.environ, "SPARK_LOCAL_IP": HOST}
    done = subprocess.run([sys.executable, "-m", "fruitpipe.cli", *arguments], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{cluster.logs()[-3000:]}"
    return done


def test_both_workers_executors_processed_shards(cluster_run):
    cluster, output, _ = cluster_run
    stats = [json.loads(path.read_text()) for path in sorted((output / "_shards").glob("part-*.json"))]
    assert len(stats) == 4
    executors = {s["executor"]["executor_id"] for s in stats}
    assert "driver" not in executors and len(executors) == 2, stats
    # Each executor id in the stats is a work dir under exactly one worker: both workers did work.
    dirs = cluster.executor_dirs()
    by_worker = {index: {path.name for path in paths} for index, paths in dirs.items()}
    assert all(by_worker[index] & executors for index in (0, 1)), by_worker


def test_cluster_run_equals_the_local_run(cluster_run, finished_run):
    _, output, done = cluster_run
    remote = pd.read_parquet(output / "features").set_index("image_id").sort_index()
    local = finished_run.features().set_index("image_id").sort_index()
    assert list(remote.index) == list(local.index)
    assert list(remote["path"]) == list(local["path"]) and list(remote["label"]) == list(local["label"])
    np.testing.assert_allclose(vectors(remote, "features"), vectors(local, "features"), atol=1e-5)
    assert_pca_equal(pd.read_parquet(output / "pca"), finished_run.pca(), atol=1e-4)

    manifest = json.loads((output / "manifest.json").read_text())
    local_manifest = json.loads((Path(finished_run.output) / "manifest.json").read_text())
    for key in ("images_listed", "images_ok", "images_failed", "shards", "pca_k"):
        assert manifest[key] == local_manifest[key], key
    assert "images:" in done.stdout and "0 failed" in done.stdout


def test_cluster_processes_are_gone_after_stop(demo_root, tmp_path):
    cluster = SparkCluster(tmp_path / "spark", workers=1, cores=1, memory="512m")
    with cluster:
        assert cluster.state() is not None
        processes = cluster.processes
    assert all(process.poll() is not None for process in processes)
    assert cluster.state() is None


def test_index_similar_and_duplicates_on_the_cluster_run(cluster_run, demo_root):
    """The uses of the features work on a run the cluster made, and `similar` extracts its queries on the cluster's
    executors: a training image finds itself first, at distance ~0."""
    cluster, output, _ = cluster_run
    env = {**os.environ, "SPARK_LOCAL_IP": HOST}

    def fruitpipe(*arguments: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "fruitpipe.cli", *arguments], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, f"{done.stderr[-3000:]}\n{cluster.logs()[-3000:]}"
        return done

    fruitpipe("index", str(output))
    query = sorted((demo_root / "Training").glob("*/*.jpg"))[5]
    found = json.loads(fruitpipe("similar", str(output), str(query), "--k", "3", "--json", "--master",
                                 cluster.master_url, "--spark-conf", f"spark.driver.host={HOST}",
                                 "--spark-conf", "spark.executor.memory=512m").stdout)
    (answer,) = found["queries"]
    nearest = answer["neighbours"][0]
    assert nearest["path"] == str(query.relative_to(demo_root)) and nearest["distance"] < 1e-4, answer
    fruitpipe("duplicates", str(output))
    summary = json.loads((output / "duplicates" / "summary.json").read_text())
    assert summary["groups"] == 0, summary


def test_a_run_grows_on_the_cluster_and_equals_the_run_from_scratch(cluster_run, demo_root, cache_dir, tmp_path):
    """The same command after photos were added extracts only them, on the cluster's executors, and ends with the
    outputs of the cluster's run over the whole source (same rows, features within 1e-5, PCA up to sign). The first
    run, which the cluster's own run already covers, takes the local engine: a cluster application costs more."""
    cluster, whole, _ = cluster_run
    source = tmp_path / "fruits"
    shutil.copytree(demo_root, source)
    parked = tmp_path / "parked"
    parked.mkdir()
    held = [sorted(folder.glob("*.jpg"))[3] for folder in sorted((source / "Training").iterdir())]
    for image in held:
        image.rename(parked / f"{image.parent.name}-{image.name}")
    output = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "fruitpipe.cli", "run", str(source), str(output), "--engine", "local",
                            "--pca-k", "10", "--shard-size", "20", "--cache-dir", cache_dir], capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    stats_before = {path.name: path.read_bytes() for path in (output / "_shards").iterdir()}
    for image in held:
        (parked / f"{image.parent.name}-{image.name}").rename(image)
    done = _run_on_cluster(cluster, source, output, cache_dir)

    after = {path.name: path.read_bytes() for path in (output / "_shards").iterdir()}
    assert {name: after[name] for name in stats_before} == stats_before, "an existing shard was rewritten"
    new_stats = [json.loads(after[name]) for name in sorted(set(after) - set(stats_before))]
    assert new_stats and sum(s["images"] for s in new_stats) == len(held)
    assert "driver" not in {s["executor"]["executor_id"] for s in new_stats}, new_stats
    generations = json.loads((output / "manifest.json").read_text())["generations"]
    first_count = sum(json.loads(stats)["images"] for stats in stats_before.values())
    assert [(g["images_added"], g["images_removed"], g["shards_added"]) for g in generations] \
        == [(first_count, 0, len(stats_before)), (len(held), 0, len(new_stats))]
    assert f"({len(after)} shards, {len(stats_before)} resumed)" in done.stdout

    grown = pd.read_parquet(output / "features").set_index("image_id").sort_index()
    scratch = pd.read_parquet(whole / "features").set_index("image_id").sort_index()
    assert list(grown.index) == list(scratch.index)
    keys = ["path", "label", "label_index", "split"]
    assert (grown[keys] == scratch[keys]).all().all()
    np.testing.assert_allclose(vectors(grown, "features"), vectors(scratch, "features"), atol=1e-5)
    assert_pca_equal(pd.read_parquet(output / "pca"), pd.read_parquet(whole / "pca"), atol=1e-4)
