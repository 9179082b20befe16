"""The EMR step, run here the way EMR runs it: nothing of the dev environment takes part in the run itself.

1. `fruitpipe emr upload` and `emr submit` run for real against moto: the wheel, the model artifact and the
   bootstrap script land in S3, and the step EMR would run is read back from moto's EMR API.
2. The bootstrap script `emr upload` renders runs with bash into a temporary NODE_ROOT. It fetches the wheel from
   moto's S3 with the real AWS CLI (awscli from PyPI, in its own venv), as a node does, and builds the node venv:
   base dependencies only, so `import torch` must fail there.
3. The step's exact argument list runs with spark-submit from Spark 3.5 (EMR 7's line, `make test`'s second
   environment) and from Spark 4.0 (emr-spark-8's line, this environment's pyspark). Only the master changes
   (`yarn` -> `local[2]`) and the node paths move into the temp NODE_ROOT; PYSPARK_PYTHON is what the cluster's
   spark-env sets; the source and the output are on moto's S3.
4. The outputs equal the local run's, and `emr download` brings them back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

import pyspark
from fruitpipe import cli
from fruitpipe.cloud import bootstrap, specs
from fruitpipe.cloud.config import load_emr_config
from tests.support.moto_server import MotoServer
from tests.support.venvs import cached_venv
from tests.support.compare import assert_pca_equal, vectors
from tests.support.s3 import create_bucket, upload_tree

pytestmark = [pytest.mark.emr_node, pytest.mark.s3, pytest.mark.spark]

BUCKET = "fruitpipe-node-test"
AWSCLI = "awscli==1.46.3"
SPARK35_VENV_ENV = "FRUITPIPE_SPARK35_VENV"


def spark_home(line: str) -> Path:
    """The pyspark folder whose bin/spark-submit stands in for the cluster's Spark of that line."""
    if line == "4.0":
        return Path(pyspark.__file__).parent
    venv = os.environ.get(SPARK35_VENV_ENV)
    if not venv:
        pytest.skip(f"{SPARK35_VENV_ENV} is not set: `make test` builds Spark 3.5's environment and sets it")
    found = sorted(Path(venv).glob("lib/python3*/site-packages/pyspark"))
    assert found, f"no pyspark in {venv}"
    return found[0]


@pytest.fixture(scope="module")
def aws(tmp_path_factory, demo_root):
    """moto with the demo photos under s3://BUCKET/fruitpipe/input/, and a config file for `fruitpipe emr`."""
    work = tmp_path_factory.mktemp("emr-node")
    with MotoServer() as moto:
        client = create_bucket(moto, BUCKET)
        upload_tree(client, demo_root, BUCKET, "fruitpipe/input")
        yield moto, work


@pytest.fixture(scope="module")
def config(aws, cache_dir) -> Path:
    """The user's config file: the emr: section, and a run setting that travels to the nodes with it."""
    _, work = aws
    path = work / "fruitpipe.yaml"
    path.write_text(yaml.safe_dump({"cache_dir": cache_dir, "quiet": True,
                                    "emr": {"bucket": BUCKET, "cluster_name": "node-test"}}))
    return path


def _emr(moto: MotoServer, config: Path, *argv: str) -> None:
    """`fruitpipe --config CONFIG emr ARGV`, in this process, with boto3 pointed at moto."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("AWS_PROFILE", raising=False)
        for name, value in moto.env().items():
            patch.setenv(name, value)
        assert cli.main(["--config", str(config), "emr", *argv]) == 0


@pytest.fixture(scope="module")
def node(aws, config):
    """`emr upload`, then the bootstrap it renders, run with bash: the node's NODE_ROOT and its environment."""
    moto, work = aws
    _emr(moto, config, "upload")
    emr = load_emr_config(str(config), {})
    root = bootstrap.project_root()
    node_root = work / "node"
    script = bootstrap.render_bootstrap(bootstrap.executor_pins(root), _uploaded_wheel(moto, emr), root=str(node_root))
    (work / "bootstrap.sh").write_text(script)
    aws_cli = cached_venv("awscli", [AWSCLI]) / "bin"
    node_env = {key: value for key, value in os.environ.items()
                if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")
                and not key.startswith("AWS_")}
    node_env.update(moto.env())
    node_env["PATH"] = os.pathsep.join([str(aws_cli), "/usr/local/bin", "/usr/bin", "/bin"])
    install = subprocess.run(["bash", str(work / "bootstrap.sh")], cwd=work, env=node_env, capture_output=True,
                             text=True, timeout=900, check=False)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]
    python = node_root / "venv" / "bin" / "python"
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, check=False)
    print(f"node venv {python}: `import torch` -> {no_torch.stderr.strip().splitlines()[-1]}")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    return node_root, node_env


def _uploaded_wheel(moto: MotoServer, emr) -> str:
    keys = [item["Key"] for item in moto.client("s3").list_objects_v2(
        Bucket=BUCKET, Prefix=emr.code_prefix + "/")["Contents"]]
    wheels = [key for key in keys if key.endswith(".whl")]
    assert len(wheels) == 1, keys
    return f"s3://{BUCKET}/{wheels[0]}"


def _submitted_steps(moto: MotoServer, config: Path, run_name: str) -> list[list[str]]:
    """`emr submit` on a cluster moto keeps; the arguments of the steps it added, in the order EMR runs them."""
    emr_api = moto.client("emr")
    cluster_id = emr_api.run_job_flow(
        Name="node-test", ReleaseLabel=load_emr_config(str(config), {}).release_label,
        Instances={"InstanceGroups": [{"InstanceRole": "MASTER", "InstanceType": "m5.xlarge", "InstanceCount": 1}],
                   "KeepJobFlowAliveWhenNoSteps": True},
        JobFlowRole="EMR_EC2_DefaultRole", ServiceRole="EMR_DefaultRole")["JobFlowId"]
    try:
        _emr(moto, config, "submit", "--cluster", cluster_id, "--run-name", run_name, "--",
             "--pca-k", "10", "--shard-size", "20")
        steps = emr_api.list_steps(ClusterId=cluster_id)["Steps"]
        return [step["Config"]["Args"] for step in reversed(steps)]
    finally:
        emr_api.terminate_job_flows(JobFlowIds=[cluster_id])


def _as_run_here(args: list[str], home: Path, node_root: Path) -> list[str]:
    """A step's arguments with only what differs from a cluster swapped: Spark's home, the master, node paths.

    command-runner.jar runs the first argument from the master's PATH: spark-submit there, the real AWS CLI here.
    """
    program = str(home / "bin" / "spark-submit") if args[0] == "spark-submit" else args[0]
    swapped = [program]
    for arg in args[1:]:
        arg = "local[2]" if arg == "yarn" else arg
        arg = arg.replace(specs.NODE_RUN_CONFIG, str(node_root / "home" / Path(specs.NODE_RUN_CONFIG).name))
        swapped.append(arg.replace(specs.NODE_ROOT, str(node_root)))
    return swapped


def _spark_env(node_root: Path) -> dict[str, str]:
    """PYSPARK_PYTHON and friends exactly as the cluster's spark-env classification exports them."""
    exports = [c for c in specs.spark_configurations(load_emr_config(None, {})) if c["Classification"] == "spark-env"]
    properties = exports[0]["Configurations"][0]["Properties"]
    return {key: value.replace(specs.NODE_ROOT, str(node_root)) for key, value in properties.items()}


@pytest.mark.parametrize("line", ["3.5", "4.0"])
def test_the_steps_run_in_the_node_environment_and_equal_a_local_run(line, aws, config, node, finished_run,
                                                                     tmp_path):
    moto, _ = aws
    node_root, node_env = node
    home = spark_home(line)
    run_name = f"node-spark-{line.replace('.', '')}"
    steps = _submitted_steps(moto, config, run_name)
    assert [args[0] for args in steps] == ["aws", "spark-submit"]
    assert "--model-file" in steps[-1]

    (node_root / "home").mkdir(exist_ok=True)
    env = {**node_env, **_spark_env(node_root), "SPARK_HOME": str(home)}
    for args in steps:
        done = subprocess.run(_as_run_here(args, home, node_root), cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900, check=False)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "images: 72 ok, 0 failed of 72 listed" in done.stdout, done.stdout
    print(f"Spark {line}: {done.stdout.strip()}")

    downloaded = tmp_path / "downloaded"
    _emr(moto, config, "download", run_name, "--out", str(downloaded))
    info = json.loads((downloaded / "model_info" / "model_info.json").read_text())
    assert info["versions"]["pyspark"].startswith(line)
    ours = pd.read_parquet(downloaded / "features").set_index("image_id").sort_index()
    local = finished_run.features().set_index("image_id").sort_index()
    assert list(ours.index) == list(local.index)
    assert abs(vectors(ours, "features") - vectors(local, "features")).max() < 1e-5
    assert_pca_equal(pd.read_parquet(downloaded / "pca"), finished_run.pca(), atol=1e-4)


def test_node_environment_is_the_bootstrap_s_not_the_dev_one(node):
    node_root, node_env = node
    python = node_root / "venv" / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import fruitpipe, importlib.util as u; print(fruitpipe.__file__); "
                            "print(u.find_spec('pyspark'), u.find_spec('onnx'))"], cwd=node_root, env=node_env,
                           capture_output=True, text=True, check=True)
    module, missing = probe.stdout.strip().splitlines()
    assert module.startswith(str(node_root)) and missing == "None None"
    assert shutil.which("spark-submit", path=str(node_root / "venv" / "bin")) is None
    assert sys.executable not in (node_root / "launch.py").read_text()
