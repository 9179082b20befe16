"""Tasks x threads stay within the cores (issue 10 part 2): with --threads-per-task 2 on two cores, Spark runs one
task at a time (spark.task.cpus follows the threads) and the local pool starts one worker, so no two shards ever
compute side by side; with one thread per task both cores work at once."""

from __future__ import annotations

import itertools
import json
import subprocess

import pytest

from fruitpipe.config import RunConfig
from fruitpipe.distributors import spark_settings
from tests.support.processes import cli

# A small, fast model: what matters is when each shard ran.
SETTINGS = ["--model", "mobilenet_v2", "--weights", "random", "--image-size", "64", "--limit", "48",
            "--shard-size", "12", "--pca-k", "4", "--quiet"]


def _shard_intervals(output) -> list[tuple[float, float, int]]:
    """(start, end, runtime threads) of every shard, from its stats file."""
    intervals = []
    for path in sorted((output / "_shards").glob("part-*.json")):
        stats = json.loads(path.read_text())
        intervals.append((stats["finished_at"] - stats["seconds"]["wall"], stats["finished_at"],
                          stats["runtime"]["threads"]))
    return intervals


def _overlapping(intervals: list[tuple[float, float, int]]) -> int:
    return sum(1 for (a_start, a_end, _), (b_start, b_end, _) in itertools.combinations(intervals, 2)
               if a_start < b_end - 0.01 and b_start < a_end - 0.01)


@pytest.mark.parametrize("engine", ["spark", "local"])
def test_two_thread_tasks_on_two_cores_run_one_at_a_time(engine, demo_root, cache_dir, tmp_path):
    output = tmp_path / engine
    done = subprocess.run(cli("run", str(demo_root), str(output), *SETTINGS, "--engine", engine, "--master",
                              "local[2]", "--threads-per-task", "2", "--cache-dir", cache_dir),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    intervals = _shard_intervals(output)
    assert len(intervals) == 4 and {threads for _, _, threads in intervals} == {2}
    assert _overlapping(intervals) == 0, intervals


def test_the_spark_layout_follows_the_threads_and_the_users_setting_wins():
    assert "spark.task.cpus" not in spark_settings(RunConfig(source="s", output="o"))
    assert spark_settings(RunConfig(source="s", output="o", threads_per_task=4))["spark.task.cpus"] == "4"
    chosen = RunConfig(source="s", output="o", threads_per_task=4, spark_conf={"spark.task.cpus": "2"})
    assert spark_settings(chosen)["spark.task.cpus"] == "2"
