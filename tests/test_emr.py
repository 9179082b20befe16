"""`fruitpipe emr`: pure builders as data, and every command over HTTP against a moto server on loopback.

Real AWS is never called: the environment points boto3 at moto with fake credentials that are
recognisable, so a test can prove that no command prints or writes them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from fruitpipe.cloud import bootstrap, cli, client, commands, cost, prices, specs
from fruitpipe.cloud import audit as audit_module
from fruitpipe.cloud.client import AwsError
from fruitpipe.cloud.config import DEFAULT_RELEASE, EmrConfig, load_emr_config
from fruitpipe.cloud.instances import INSTANCE_TYPES
from fruitpipe.errors import FruitpipeError
from fruitpipe.models.artifact import export_artifact
from tests.support.moto_server import MotoServer

ROOT = Path(__file__).resolve().parents[1]
FAKE_ACCESS_KEY = "AKIAFRUITPIPE7FAKEID"
FAKE_SECRET_KEY = "fRuItPiPeFaKeSeCrEt/doNotPrint+0123456789"
FAKE_SESSION_TOKEN = "FruitpipeFakeSessionTokenDoNotPrintXYZ0123456789"
SECRETS = (FAKE_ACCESS_KEY, FAKE_SECRET_KEY, FAKE_SESSION_TOKEN)


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        yield server


@pytest.fixture
def aws_env(moto, monkeypatch):
    """boto3 pointed at moto with recognisable fake credentials."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in moto.env(access_key=FAKE_ACCESS_KEY, secret_key=FAKE_SECRET_KEY).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_SESSION_TOKEN)
    return moto


@dataclass
class Sent:
    operation: str
    params: dict[str, Any]
    signing_region: str | None = None


@pytest.fixture
def sent(monkeypatch) -> list[Sent]:
    """Every request the commands send, captured with botocore's event hooks before it leaves the process."""
    requests: list[Sent] = []
    real_session = client.new_session

    def on_params(params, model, **_):
        requests.append(Sent(model.name, copy.deepcopy(params)))

    def on_send(request, **_):
        authorization = request.headers.get("Authorization", b"")
        if isinstance(authorization, bytes):
            authorization = authorization.decode()
        scope = re.search(r"Credential=[^/]+/\d{8}/([^/]+)/", authorization)
        if requests and scope:
            requests[-1].signing_region = scope.group(1)

    def capturing_session(region):
        session = real_session(region)
        session.events.register("provide-client-params", on_params)
        session.events.register("before-send", on_send)
        return session

    monkeypatch.setattr(client, "new_session", capturing_session)
    return requests


@dataclass
class Result:
    rc: int
    out: str
    err: str


class Runner:
    """Runs `fruitpipe --config FILE emr ...` in-process and keeps every output for the secret check."""

    def __init__(self, capsys, config_path: Path) -> None:
        self.capsys = capsys
        self.config_path = config_path
        self.transcript: list[str] = []

    def __call__(self, *argv: str) -> Result:
        self.capsys.readouterr()
        rc = cli.main(["--config", str(self.config_path), "emr", *argv])
        captured = self.capsys.readouterr()
        self.transcript += [captured.out, captured.err]
        return Result(rc, captured.out, captured.err)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def write_config(path: Path, **emr: Any) -> Path:
    path.write_text(yaml.safe_dump({"emr": emr}), encoding="utf-8")
    return path


def fresh_config(folder: Path) -> tuple[Path, str, str]:
    """(config path, bucket, cluster name): fresh names, so tests sharing the server do not meet."""
    bucket, name = unique("fruitpipe-test"), unique("fp")
    config_path = write_config(folder / "fruitpipe.yaml", bucket=bucket, cluster_name=name, idle_timeout_s=1800,
                               tags={"owner": "data-team"})
    return config_path, bucket, name


@pytest.fixture
def setup(aws_env, capsys, tmp_path):
    """A runner on a config of its own, with its bucket and cluster names."""
    config_path, bucket, name = fresh_config(tmp_path)
    return Runner(capsys, config_path), bucket, name


def assert_no_secrets(texts: list[str], roots: list[Path] = (), blobs: list[bytes] = ()) -> None:
    for secret in SECRETS:
        for text in texts:
            assert secret not in text
        for blob in blobs:
            assert secret.encode() not in blob
        for root in roots:
            for file in root.rglob("*"):
                if file.is_file():
                    assert secret.encode() not in file.read_bytes(), f"{secret[:6]}... written to {file}"


def json_documents(text: str) -> list[dict[str, Any]]:
    """The JSON objects printed one after another by --dry-run."""
    decoder, documents, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        document, index = decoder.raw_decode(text, index)
        documents.append(document)
    return documents


def start_cluster(moto: MotoServer, name: str) -> str:
    """A cluster made directly on the server, for tests about the commands that act on one."""
    return moto.client("emr").run_job_flow(
        Name=name, ReleaseLabel="emr-7.5.0", Instances={"InstanceGroups": [
            {"InstanceRole": "MASTER", "InstanceType": "m5.xlarge", "InstanceCount": 1},
            {"InstanceRole": "CORE", "InstanceType": "m5.xlarge", "InstanceCount": 2}],
            "KeepJobFlowAliveWhenNoSteps": True},
        JobFlowRole="EMR_EC2_DefaultRole", ServiceRole="EMR_DefaultRole")["JobFlowId"]


def make_bucket(moto: MotoServer, bucket: str, region: str = "eu-west-1") -> None:
    extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    moto.client("s3", region).create_bucket(Bucket=bucket, **extra)


def cluster_state(moto: MotoServer, cluster_id: str) -> str:
    return moto.client("emr").describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["State"]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# ------------------------------------------------------------------ the whole lifecycle


@dataclass
class Lifecycle:
    """What one EMR lifecycle's steps hand on to the next: the names, the cluster, its step and every output."""

    bucket: str
    name: str
    config_path: Path
    folder: Path
    failures_before: int
    transcript: list[str] = field(default_factory=list)
    cluster_id: str = ""
    step_id: str = ""


@pytest.fixture(scope="class")
def lifecycle(tmp_path_factory, request) -> Lifecycle:
    folder = tmp_path_factory.mktemp("lifecycle")
    config_path, bucket, name = fresh_config(folder)
    return Lifecycle(bucket, name, config_path, folder, failures_before=request.session.testsfailed)


@pytest.fixture
def lifecycle_emr(lifecycle, aws_env, capsys, request) -> Runner:
    """The lifecycle's runner for one step. Each step builds on the ones before, so after a failure the rest skip
    and the failure names its step."""
    if request.session.testsfailed > lifecycle.failures_before:
        pytest.skip("an earlier step of the EMR lifecycle failed")
    runner = Runner(capsys, lifecycle.config_path)
    runner.transcript = lifecycle.transcript
    return runner


class TestLifecycle:
    """check, roles create, upload, up, submit, status, watch, logs, download, audit, down, cost: in this order,
    on one bucket and one cluster."""

    def test_check_lists_what_is_missing(self, lifecycle_emr):
        result = lifecycle_emr("check")
        assert result.rc == 1
        assert re.search(r"MISSING\s+bucket", result.out) and re.search(r"MISSING\s+iam role\s+EMR_DefaultRole",
                                                                        result.out)
        assert "account 123456789012" in result.out

    def test_roles_create(self, lifecycle_emr, moto):
        iam = moto.client("iam")
        assert lifecycle_emr("roles", "create").rc == 0
        profile = iam.get_instance_profile(InstanceProfileName="EMR_EC2_DefaultRole")["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == ["EMR_EC2_DefaultRole"]
        attached = iam.list_attached_role_policies(RoleName="EMR_DefaultRole")["AttachedPolicies"]
        assert attached[0]["PolicyName"] == "AmazonElasticMapReduceRole"

    def test_upload_creates_a_private_encrypted_bucket_with_the_code(self, lifecycle, lifecycle_emr, moto):
        s3, bucket = moto.client("s3"), lifecycle.bucket
        result = lifecycle_emr("upload")
        assert result.rc == 0, result.err
        code = f"s3://{bucket}/fruitpipe/code/"
        assert result.out.split() == [f"{code}fruitpipe-0.1.0-py3-none-any.whl", f"{code}model/feature_extractor.onnx",
                                      f"{code}model/model.json", f"{code}bootstrap.sh", f"{code}run.yaml"]
        model_json = json.loads(s3.get_object(Bucket=bucket, Key="fruitpipe/code/model/model.json")["Body"].read())
        onnx = s3.get_object(Bucket=bucket, Key="fruitpipe/code/model/feature_extractor.onnx")["Body"].read()
        assert model_json["model"] == "efficientnet_lite0" and model_json["precision"] == "fp32"
        assert model_json["onnx_sha256"] == hashlib.sha256(onnx).hexdigest()
        block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        assert block == {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                         "RestrictPublicBuckets": True}
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
        assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        assert s3.get_bucket_location(Bucket=bucket)["LocationConstraint"] == "eu-west-1"
        assert {"Key": "project", "Value": "fruitpipe"} in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]
        script = s3.get_object(Bucket=bucket, Key="fruitpipe/code/bootstrap.sh")["Body"].read().decode()
        assert "set -euo pipefail" in script and f"aws s3 cp --only-show-errors {code}fruitpipe-0.1.0" in script
        wheel = s3.get_object(Bucket=bucket, Key="fruitpipe/code/fruitpipe-0.1.0-py3-none-any.whl")["Body"].read()
        assert "fruitpipe/cloud/cli.py" in zipfile.ZipFile(io.BytesIO(wheel)).namelist()
        run_config = s3.get_object(Bucket=bucket, Key="fruitpipe/code/run.yaml")["Body"].read()
        assert run_config == lifecycle.config_path.read_bytes()

    def test_check_is_ready_after_upload(self, lifecycle_emr):
        result = lifecycle_emr("check")
        assert result.rc == 0, result.out
        assert re.search(r"ok\s+public access\s+blocked", result.out) and "ready" in result.out

    def test_up_waits_for_the_cluster(self, lifecycle, lifecycle_emr, moto, sent):
        emr_api, bucket, code = moto.client("emr"), lifecycle.bucket, f"s3://{lifecycle.bucket}/fruitpipe/code/"
        result = lifecycle_emr("up", "--wait", "--interval", "0.05", "--timeout", "5")
        assert result.rc == 0, result.err
        cluster_id = lifecycle.cluster_id = result.out.strip()
        assert re.fullmatch(r"j-[0-9A-Z]+", cluster_id) and "WAITING" in result.err
        # moto does not store AutoTerminationPolicy, and its EMR places every cluster in its us-east-1
        # backend when reached through a custom endpoint, so both are checked on the request as sent.
        run = next(r for r in sent if r.operation == "RunJobFlow")
        assert run.params["AutoTerminationPolicy"] == {"IdleTimeout": 1800}
        assert run.signing_region == "eu-west-1"
        cluster = emr_api.describe_cluster(ClusterId=cluster_id)["Cluster"]
        tags = {t["Key"]: t["Value"] for t in cluster["Tags"]}
        assert tags == {"project": "fruitpipe", "owner": "data-team"}
        assert cluster["VisibleToAllUsers"] is True and cluster["LogUri"] == f"s3://{bucket}/fruitpipe/logs/"
        assert cluster["ReleaseLabel"] == DEFAULT_RELEASE and cluster["Name"] == lifecycle.name
        spark_defaults = next(c for c in cluster["Configurations"] if c["Classification"] == "spark-defaults")
        assert spark_defaults["Properties"]["spark.executorEnv.OMP_NUM_THREADS"] == "1"
        assert spark_defaults["Properties"]["spark.pyspark.python"] == specs.NODE_PYTHON
        actions = emr_api.list_bootstrap_actions(ClusterId=cluster_id)["BootstrapActions"]
        assert [a["ScriptPath"] for a in actions] == [f"{code}bootstrap.sh"]
        groups = {g["InstanceGroupType"]: g
                  for g in emr_api.list_instance_groups(ClusterId=cluster_id)["InstanceGroups"]}
        assert groups["CORE"]["RequestedInstanceCount"] == 2 and groups["MASTER"]["Market"] == "ON_DEMAND"

    def test_submit_adds_the_config_fetch_and_run_steps(self, lifecycle, lifecycle_emr, moto):
        bucket, cluster_id, code = lifecycle.bucket, lifecycle.cluster_id, f"s3://{lifecycle.bucket}/fruitpipe/code/"
        assert lifecycle_emr("submit", "--run-name", "../escape").rc == 2
        result = lifecycle_emr("submit", "--mode", "mini", "--run-name", "first", "--", "--batch-size", "32")
        assert result.rc == 0, result.err
        step_id = lifecycle.step_id = result.out.strip()
        steps = {s["Id"]: s for s in moto.client("emr").list_steps(ClusterId=cluster_id)["Steps"]}
        args = steps[step_id]["Config"]["Args"]
        assert args == ["spark-submit", "--master", "yarn", "--deploy-mode", "client", specs.NODE_LAUNCHER,
                        "--config", specs.NODE_RUN_CONFIG, "run", f"s3://{bucket}/fruitpipe/input/",
                        f"s3://{bucket}/fruitpipe/output/first/", "--mode", "mini", "--master", "yarn",
                        "--model-file", f"{code}model", "--batch-size", "32"]
        assert steps[step_id]["Config"]["Jar"] == "command-runner.jar"
        fetch = next(s for s in steps.values() if s["Id"] != step_id)
        assert fetch["Config"]["Args"][-2:] == [f"{code}run.yaml", specs.NODE_RUN_CONFIG]

    def test_submit_wait_stops_at_its_timeout(self, lifecycle_emr):
        # moto never finishes a step, so following one ends at the timeout with the state it reached.
        result = lifecycle_emr("submit", "--run-name", "second", "--wait", "--interval", "0.05", "--timeout", "0.2")
        assert result.rc == 1 and "stopped waiting" in result.err

    def test_status(self, lifecycle, lifecycle_emr):
        result = lifecycle_emr("status")
        assert result.rc == 0
        assert f"cluster {lifecycle.cluster_id} ({lifecycle.name}): RUNNING" in result.out
        assert f"step {lifecycle.step_id}" in result.out
        assert "2 x m5.xlarge" in result.out

    def test_watch_stops_at_its_timeout(self, lifecycle, lifecycle_emr):
        result = lifecycle_emr("watch", "--interval", "0.05", "--timeout", "0.2")
        assert result.rc == 0 and "stopped watching" in result.err
        assert re.search(rf"\+0:00:00: cluster {lifecycle.cluster_id}: RUNNING", result.out)
        assert re.search(rf"step {lifecycle.step_id} \(fruitpipe run --mode mini\): (PENDING|RUNNING)", result.out)

    def test_logs_are_downloaded_decompressed(self, lifecycle, lifecycle_emr, moto):
        s3, bucket, out = moto.client("s3"), lifecycle.bucket, lifecycle.folder / "logs"
        step_logs = f"fruitpipe/logs/{lifecycle.cluster_id}/steps/{lifecycle.step_id}/"
        s3.put_object(Bucket=bucket, Key=step_logs + "stderr.gz", Body=gzip.compress(b"starting\nTraceback: boom\n"))
        s3.put_object(Bucket=bucket, Key=step_logs + "stdout.gz", Body=gzip.compress(b"42 images\n"))
        result = lifecycle_emr("logs", "--step", lifecycle.step_id, "--out", str(out), "--tail", "1")
        assert result.rc == 0, result.err
        assert (out / "stderr").read_text() == "starting\nTraceback: boom\n"
        assert (out / "stdout").read_text() == "42 images\n"
        assert result.out.rstrip().endswith("Traceback: boom")

    def test_download_copies_a_run_and_keeps_what_is_there(self, lifecycle, lifecycle_emr, moto):
        s3, out = moto.client("s3"), lifecycle.folder / "first"
        for key, body in {"first/features.parquet/part-0.parquet": b"PAR1", "first/report.html": b"<html>"}.items():
            s3.put_object(Bucket=lifecycle.bucket, Key=f"fruitpipe/output/{key}", Body=body)
        result = lifecycle_emr("download", "first", "--out", str(out))
        assert result.rc == 0, result.err
        assert (out / "features.parquet" / "part-0.parquet").read_bytes() == b"PAR1"
        assert (out / "report.html").read_bytes() == b"<html>"
        assert lifecycle_emr("download", "first", "--out", str(out)).rc == 2

    def test_audit_lists_the_cluster_and_the_bucket(self, lifecycle, lifecycle_emr):
        result = lifecycle_emr("audit")
        assert result.rc == 0
        assert lifecycle.cluster_id in result.out and f"{lifecycle.bucket} (eu-west-1): " in result.out

    def test_down_asks_first(self, lifecycle, lifecycle_emr, moto, monkeypatch):
        result = lifecycle_emr("down")
        assert result.rc == 2 and "pass --yes" in result.err
        monkeypatch.setattr("sys.stdin", FakeTerminal("n\n"))
        assert lifecycle_emr("down").rc == 1
        assert cluster_state(moto, lifecycle.cluster_id) != "TERMINATED"
        monkeypatch.setattr("sys.stdin", FakeTerminal("y\n"))
        assert lifecycle_emr("down", "--wait", "--interval", "0.05").rc == 0
        assert cluster_state(moto, lifecycle.cluster_id) == "TERMINATED"

    def test_watch_ends_with_the_cluster(self, lifecycle, lifecycle_emr):
        result = lifecycle_emr("watch", "--interval", "0.05")
        assert result.rc == 0 and f"cluster {lifecycle.cluster_id}: TERMINATED" in result.out

    def test_cost_of_the_cluster(self, lifecycle, lifecycle_emr):
        result = lifecycle_emr("cost", "--cluster", lifecycle.cluster_id, "--images", "10000")
        assert result.rc == 0 and "in total" in result.out
        assert re.search(r"cost: \$\d+\.\d\d \(€\d+\.\d\d\), \$\d+\.\d{4} \(€\d+\.\d{4}\) per 10k images",
                         result.out)

    def test_no_output_file_or_object_holds_a_credential(self, lifecycle, lifecycle_emr, moto):
        s3, bucket = moto.client("s3"), lifecycle.bucket
        objects = [s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                   for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
        assert_no_secrets(lifecycle.transcript, roots=[lifecycle.folder], blobs=objects)


# ------------------------------------------------------------------ dry runs, refusals, audit


def snapshot(moto: MotoServer, bucket: str, cluster_id: str) -> dict[str, Any]:
    s3, emr_api, iam = moto.client("s3"), moto.client("emr"), moto.client("iam")
    return {
        "buckets": sorted(b["Name"] for b in s3.list_buckets()["Buckets"]),
        "objects": sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])),
        "clusters": sorted((c["Id"], c["Status"]["State"]) for c in emr_api.list_clusters()["Clusters"]),
        "steps": [s["Id"] for s in emr_api.list_steps(ClusterId=cluster_id)["Steps"]],
        "roles": sorted(r["RoleName"] for r in iam.list_roles()["Roles"]),
        "profiles": sorted(p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]),
    }


def test_dry_run_prints_requests_and_changes_nothing(setup, moto, tmp_path):
    emr, bucket, name = setup
    other_bucket = unique("fruitpipe-dry")
    emr.config_path = write_config(tmp_path / "dry.yaml", bucket=other_bucket, cluster_name=name,
                                   service_role=unique("Role"), instance_profile=unique("Profile"))
    make_bucket(moto, other_bucket)
    moto.client("s3").put_object(Bucket=other_bucket, Key="fruitpipe/code/bootstrap.sh", Body=b"#!/bin/bash\n")
    cluster_id = start_cluster(moto, name)
    before = snapshot(moto, other_bucket, cluster_id)

    expected = {
        ("roles", "create"): ["CreateRole", "AttachRolePolicy", "CreateRole", "AttachRolePolicy",
                              "CreateInstanceProfile", "AddRoleToInstanceProfile"],
        ("upload",): ["PutObject"] * 5,
        ("up",): ["RunJobFlow"],
        ("submit", "--mode", "apples"): ["PutObject", "AddJobFlowSteps"],
        ("down",): ["TerminateJobFlows"],
    }
    for argv, operations in expected.items():
        result = emr(*argv, "--dry-run")
        assert result.rc == 0, (argv, result.err)
        documents = json_documents(result.out)
        assert [d["operation"] for d in documents] == operations, argv
        assert all(d["dry_run"] and d["region"] == "eu-west-1" for d in documents)
    up_request = json_documents(emr("up", "--dry-run").out)[0]["parameters"]
    assert up_request == specs.cluster_request(load_emr_config(str(emr.config_path), {}))

    assert snapshot(moto, other_bucket, cluster_id) == before
    assert_no_secrets(emr.transcript)


def test_bucket_create_dry_run_lists_the_security_settings(setup, moto):
    emr, bucket, _ = setup
    result = emr("bucket", "create", "--dry-run")
    assert result.rc == 0
    operations = {d["operation"]: d["parameters"] for d in json_documents(result.out)}
    assert list(operations) == ["CreateBucket", "PutPublicAccessBlock", "PutBucketEncryption", "PutBucketTagging"]
    assert all(operations["PutPublicAccessBlock"]["PublicAccessBlockConfiguration"].values())
    assert bucket not in [b["Name"] for b in moto.client("s3").list_buckets()["Buckets"]]


def test_submit_refuses_a_bucket_in_another_region_unless_allowed(setup, moto, tmp_path):
    emr, bucket, name = setup
    make_bucket(moto, bucket)
    foreign = unique("fruitpipe-us")
    make_bucket(moto, foreign, region="us-east-1")
    start_cluster(moto, name)

    result = emr("submit", "--input", f"s3://{foreign}/photos/")
    assert result.rc == 2
    assert f"s3://{foreign} is in us-east-1, not eu-west-1" in result.err and "allow_other_region" in result.err
    assert emr("submit", "--input", "/home/me/photos").rc == 2

    emr.config_path = write_config(tmp_path / "allow.yaml", bucket=bucket, cluster_name=name, allow_other_region=True)
    result = emr("submit", "--input", f"s3://{foreign}/photos/")
    assert result.rc == 2 and "holds no model artifact: run `fruitpipe emr upload` first" in result.err
    moto.client("s3").put_object(Bucket=bucket, Key="fruitpipe/code/model/model.json", Body=b"{}")
    result = emr("submit", "--input", f"s3://{foreign}/photos/")
    assert result.rc == 0, result.err


def test_upload_offline_puts_the_wheelhouse_beside_the_wheel(setup, moto, tmp_path, monkeypatch):
    emr, bucket, _ = setup
    packed = []

    def fake_pack(pins, dest, platforms=bootstrap.NODE_PLATFORMS):
        # The real download is exercised by tests/test_emr_bootstrap.py; here only where it goes matters.
        packed.append(platforms)
        dest.mkdir(parents=True)
        with tarfile.open(dest / bootstrap.WHEELHOUSE_NAME, "w") as tar:
            tar.add(ROOT / "requirements.lock", arcname="placeholder.whl")
        return dest / bootstrap.WHEELHOUSE_NAME

    monkeypatch.setattr(commands, "pack_wheelhouse", fake_pack)
    wheel = tmp_path / "fruitpipe-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK fake wheel")
    artifact = export_artifact("efficientnet_lite0", None, str(tmp_path / "artifact"))
    result = emr("upload", "--offline", "--wheel", str(wheel), "--model-file", str(tmp_path / "artifact"))
    assert result.rc == 0, result.err
    assert "exporting" not in result.err and "efficientnet_lite0 fp32 at 224 px" in result.err
    code = f"s3://{bucket}/fruitpipe/code/"
    assert result.out.split() == [f"{code}{wheel.name}", f"{code}model/feature_extractor.onnx",
                                  f"{code}model/model.json", f"{code}wheelhouse.tar", f"{code}bootstrap.sh",
                                  f"{code}run.yaml"]
    model_json = moto.client("s3").get_object(Bucket=bucket, Key="fruitpipe/code/model/model.json")["Body"].read()
    assert json.loads(model_json)["onnx_sha256"] == artifact.onnx_sha256
    assert packed == [bootstrap.NODE_PLATFORMS]
    s3 = moto.client("s3")
    tar_bytes = s3.get_object(Bucket=bucket, Key="fruitpipe/code/wheelhouse.tar")["Body"].read()
    assert tarfile.open(fileobj=io.BytesIO(tar_bytes)).getnames() == ["placeholder.whl"]
    script = s3.get_object(Bucket=bucket, Key="fruitpipe/code/bootstrap.sh")["Body"].read().decode()
    assert f"aws s3 cp --only-show-errors {code}wheelhouse.tar" in script and "--no-index" in script


def test_the_nodes_run_config_leaves_the_weights_to_the_artifact(tmp_path):
    plain = tmp_path / "plain.yaml"
    plain.write_text("# my run\nmode: mini\nemr:\n  bucket: fruit-photos\n")
    assert commands.node_run_config(str(plain)) == plain.read_bytes()
    weighted = tmp_path / "weighted.yaml"
    weighted.write_text("model: mobilenet_v2\nweights: /home/me/mobilenet_v2.pth\nemr:\n  bucket: fruit-photos\n")
    assert yaml.safe_load(commands.node_run_config(str(weighted))) == {"model": "mobilenet_v2",
                                                                       "emr": {"bucket": "fruit-photos"}}


def test_upload_refuses_to_export_int8_in_one_line(setup, moto):
    emr, bucket, _ = setup
    emr.config_path.write_text(yaml.safe_dump({"precision": "int8", "emr": {"bucket": bucket}}))
    result = emr("upload")
    assert result.rc == 2 and result.err.count("\n") == 1 and result.out == ""
    assert "export-model OUT --precision int8 --calibration SRC` and pass --model-file OUT" in result.err
    assert bucket not in [b["Name"] for b in moto.client("s3").list_buckets()["Buckets"]]


def test_up_without_uploaded_code_is_refused(setup):
    emr, bucket, _ = setup
    result = emr("up")
    assert result.rc == 2 and "fruitpipe emr upload" in result.err


def test_commands_without_a_cluster_say_how_to_get_one(setup):
    emr, _, name = setup
    for argv in (("status",), ("submit",), ("down", "--yes"), ("logs",)):
        result = emr(*argv)
        assert result.rc == 2, argv
        assert f"no active cluster named {name}" in result.err or f"no cluster named {name}" in result.err


def test_audit_lists_what_bills_and_deletes_nothing(setup, moto):
    emr, bucket, _ = setup
    ec2 = moto.client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    instance = ec2.run_instances(ImageId=image, InstanceType="m5.xlarge", MinCount=1, MaxCount=1)["Instances"][0]
    volume = ec2.create_volume(AvailabilityZone="eu-west-1a", Size=32)["VolumeId"]
    address = ec2.allocate_address(Domain="vpc")["PublicIp"]
    make_bucket(moto, bucket)
    moto.client("s3").put_object(Bucket=bucket, Key="photo.jpg", Body=b"x" * 2048)

    result = emr("audit")
    assert result.rc == 0
    assert f"{instance['InstanceId']} m5.xlarge running" in result.out
    assert f"{volume} 32 GiB" in result.out and "(not attached)" in result.out
    assert f"{address} (not associated)" in result.out
    assert f"{bucket} (eu-west-1): 1 object(s)" in result.out
    states = [i["State"]["Name"] for r in ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"]
              for i in r["Instances"]]
    assert states == ["running"]


def plant_billables(moto: MotoServer, region: str) -> dict[str, str]:
    """One of each resource the original study's aws_audit.sh looked for, made directly on the server."""
    ec2, name = moto.client("ec2", region), unique("fp")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=f"{region}{zone}")
               ["Subnet"]["SubnetId"] for i, zone in enumerate("ab")]
    allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
    volume = ec2.create_volume(AvailabilityZone=f"{region}a", Size=8)["VolumeId"]
    moto.client("rds", region).create_db_instance(
        DBInstanceIdentifier=name, DBInstanceClass="db.t3.micro", Engine="postgres", AllocatedStorage=20,
        MasterUsername="fruit", MasterUserPassword="not-a-secret-0")
    moto.client("elbv2", region).create_load_balancer(Name=name, Subnets=subnets)
    moto.client("elb", region).create_load_balancer(
        LoadBalancerName=f"{name}-classic", AvailabilityZones=[f"{region}a"],
        Listeners=[{"Protocol": "HTTP", "LoadBalancerPort": 80, "InstancePort": 80}])
    return {
        "nat": ec2.create_nat_gateway(SubnetId=subnets[0], AllocationId=allocation)["NatGateway"]["NatGatewayId"],
        "snapshot": ec2.create_snapshot(VolumeId=volume)["SnapshotId"],
        "load balancer": f"{name} (application)",
        "classic load balancer": f"{name}-classic (classic)",
        "rds": f"{name} db.t3.micro postgres",
        "efs": moto.client("efs", region).create_file_system(CreationToken=name)["FileSystemId"],
    }


def audit_by_region(out: str) -> dict[str, str]:
    """The audit's output cut into one block of text per region header line (``eu-west-1:``)."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d:", line):
            current = line[:-1]
            blocks[current] = []
        elif current and line.startswith("  "):
            blocks[current].append(line)
        else:
            current = None
    return {region: "\n".join(lines) for region, lines in blocks.items()}


def test_audit_all_regions_with_costs_lists_what_the_original_audit_did(setup, moto, sent):
    emr, _, _ = setup
    planted = {region: plant_billables(moto, region) for region in ("eu-west-1", "us-east-1")}
    # moto answers GetCostAndUsage with what this queue holds (nothing by default, like an account without
    # usage); two monthly periods, as the 30 days before today usually span two calendar months.
    spend = {"results": [{"ResultsByTime": [
        {"TimePeriod": {"Start": "2026-10-31", "End": "2026-11-01"}, "Total": {}, "Estimated": False, "Groups": [
            {"Keys": ["Amazon Elastic Compute Cloud - Compute"],
             "Metrics": {"UnblendedCost": {"Amount": "1.50", "Unit": "USD"}}}]},
        {"TimePeriod": {"Start": "2026-11-01", "End": "2026-11-30"}, "Total": {}, "Estimated": True, "Groups": [
            {"Keys": ["Amazon Elastic Compute Cloud - Compute"],
             "Metrics": {"UnblendedCost": {"Amount": "40.25", "Unit": "USD"}}},
            {"Keys": ["Amazon Elastic MapReduce"], "Metrics": {"UnblendedCost": {"Amount": "9.1", "Unit": "USD"}}},
        ]}]}]}
    request = urllib.request.Request(f"{moto.url}/moto-api/static/ce/cost-and-usage-results",
                                     data=json.dumps(spend).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201

    result = emr("audit", "--all-regions", "--costs")
    assert result.rc == 0, result.err
    assert "Traceback" not in result.out + result.err
    blocks = audit_by_region(result.out)
    assert {"eu-west-1", "us-east-1", "eu-central-1"} <= set(blocks)
    for region, resources in planted.items():
        other = blocks["us-east-1" if region == "eu-west-1" else "eu-west-1"]
        for kind, resource in resources.items():
            assert resource in blocks[region], (kind, region)
            assert resource not in other, (kind, region)
    assert "NAT gateways (billed by the hour): " in blocks["eu-west-1"]
    assert re.search(r"Amazon Elastic Compute Cloud - Compute +41\.75 USD", result.out)
    assert re.search(r"Amazon Elastic MapReduce +9\.10 USD", result.out)
    assert re.search(r"total +50\.85 USD", result.out)
    cost_requests = [r for r in sent if r.operation == "GetCostAndUsage"]
    assert len(cost_requests) == 1 and cost_requests[0].signing_region == "us-east-1"
    assert cost_requests[0].params["GroupBy"] == [{"Type": "DIMENSION", "Key": "SERVICE"}]
    period = cost_requests[0].params["TimePeriod"]
    assert (date.fromisoformat(period["End"]) - date.fromisoformat(period["Start"])).days == 30
    assert not [r for r in sent if not r.operation.startswith(("Describe", "List", "Get", "HeadBucket"))]


def test_audit_says_what_it_could_not_read_and_carries_on(setup, moto, monkeypatch):
    emr, _, _ = setup
    planted = plant_billables(moto, "eu-west-1")

    def denied(service: str, operation: str, code: str, message: str):
        def read(aws, account):
            raise AwsError(service, operation, code, message)
        return read

    sections = [dataclasses.replace(s, read=denied("rds", "DescribeDBInstances", "AccessDenied", "not allowed"))
                if s.title == "RDS instances" else s for s in audit_module.SECTIONS]
    monkeypatch.setattr(audit_module, "SECTIONS", tuple(sections))
    def cost_explorer_off(aws, request):
        # Accounts that never enabled Cost Explorer answer like this; moto always answers, so it is injected.
        raise AwsError("ce", "GetCostAndUsage", "AccessDeniedException", "User not enabled for cost explorer access")

    monkeypatch.setattr(audit_module, "_costs_per_service", cost_explorer_off)

    result = emr("audit", "--costs")
    assert result.rc == 0, result.err
    assert "  RDS instances: not readable (AccessDenied: these credentials lack rds:DescribeDBInstances)" in result.out
    assert planted["rds"] not in result.out
    for kind in ("nat", "snapshot", "load balancer", "efs"):
        assert planted[kind] in result.out, kind
    assert re.search(r"\(Cost Explorer, unblended\): not available \(AccessDeniedException\): the credentials "
                     r"need ce:GetCostAndUsage, and Cost Explorer must be enabled", result.out)
    assert "Traceback" not in result.out + result.err


def test_check_without_credentials_says_so(moto, monkeypatch, capsys, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto.env().items():
        if not name.startswith(("AWS_ACCESS", "AWS_SECRET")):
            monkeypatch.setenv(name, value)
    runner = Runner(capsys, write_config(tmp_path / "c.yaml", bucket=unique("fruitpipe-nocreds")))
    result = runner("check")
    assert result.rc == 1 and "no usable AWS credentials" in result.out


# ------------------------------------------------------------------ the CLI contract


def test_the_fruitpipe_command_runs_emr_subcommands(aws_env, tmp_path):
    config = write_config(tmp_path / "c.yaml", bucket=unique("fruitpipe-cli"))
    result = subprocess.run([sys.executable, "-m", "fruitpipe.cli", "--config", str(config), "emr", "check"],
                            cwd=tmp_path, env=dict(os.environ), capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 1, result.stderr
    assert re.search(r"MISSING\s+bucket", result.stdout)
    assert_no_secrets([result.stdout, result.stderr])


def test_register_adds_emr_subcommands_with_handlers():
    parser = argparse.ArgumentParser(prog="fruitpipe")
    parser.add_argument("--config")
    cli.register(parser.add_subparsers(dest="command"))
    for argv in (["emr", "check"], ["emr", "roles", "create"], ["emr", "bucket", "create", "--dry-run"],
                 ["emr", "upload", "--dry-run"], ["emr", "up", "--spot", "--core-count", "4"],
                 ["emr", "submit", "--mode", "full", "--", "--x"], ["emr", "status"], ["emr", "watch"],
                 ["emr", "logs"], ["emr", "download", "run-1"], ["emr", "down", "--yes"], ["emr", "cost"],
                 ["emr", "audit"], ["emr", "policy"]):
        args = parser.parse_args(argv)
        assert callable(args.handler), argv
    assert parser.parse_args(["emr", "up", "--spot", "--core-count", "4"]).core_count == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["emr"])


def test_cost_and_policy_need_no_aws(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert cli.main(["emr", "cost", "--images", "100000", "--core-count", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 x m5.xlarge core" in out and "€" in out and "per 10k images" in out and prices.AS_OF in out
    assert cli.main(["emr", "policy", "--bucket", "fruit-photos"]) == 0
    policy = json.loads(capsys.readouterr().out)
    assert policy["Version"] == "2012-10-17"


def test_errors_are_one_line_with_exit_status_2(capsys, tmp_path):
    config = write_config(tmp_path / "bad.yaml", region="us-east-1")
    assert cli.main(["--config", str(config), "emr", "cost"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "outside the EU" in err


# ------------------------------------------------------------------ config


def test_config_defaults_yaml_and_overrides(tmp_path):
    default = load_emr_config(None, {})
    assert (default.region, default.idle_timeout_s, default.allow_other_region) == ("eu-west-1", 3600, False)
    assert default.release_label == "emr-7.13.0"
    path = write_config(tmp_path / "c.yaml", bucket="fruit-photos", core_instance_count=4, spot=True,
                        input_prefix="/photos/in/", tags={"team": "vision", "cost-centre": 42})
    config = load_emr_config(str(path), {"core_instance_count": 6, "bucket": None})
    assert (config.bucket, config.core_instance_count, config.spot) == ("fruit-photos", 6, True)
    assert config.input_prefix == "photos/in"
    assert config.all_tags() == {"team": "vision", "cost-centre": "42", "project": "fruitpipe"}
    assert config.uri(config.code_prefix, "bootstrap.sh") == "s3://fruit-photos/fruitpipe/code/bootstrap.sh"


@pytest.mark.parametrize("emr, message", [
    ({"regoin": "eu-west-1"}, "unknown emr setting(s) regoin"),
    ({"bucket": "s3://fruit"}, "not a valid S3 bucket name"),
    ({"bucket": "Fruit_Photos"}, "not a valid S3 bucket name"),
    ({"region": "us-west-2"}, "outside the EU"),
    ({"region": "mars-1"}, "not an AWS region"),
    ({"core_instance_count": "two"}, "emr.core_instance_count has the wrong type: must be an integer, got a string"),
    ({"spot": "yes"}, "emr.spot has the wrong type: must be true or false, got a string"),
    ({"tags": ["team"]}, "emr.tags must be a mapping of tag names to values"),
    ({"core_instance_count": 0}, "at least 1"),
    ({"idle_timeout_s": 30}, "between 60 s and 604800 s"),
    ({"core_instance_type": "t2.micro"}, "not one fruitpipe can size and price"),
    ({"release_label": "emr-6.15.0"}, "EMR 7.x release"),
    ({"release_label": "emr-7.0.0"}, "ships Python 3.9 only and fruitpipe's nodes need python3.11: use emr-7.1.0"),
    ({"release_label": "emr-spark-8.0"}, "emr-spark-8.x release"),
    ({"tags": {"project": "other"}}, "must not set 'project'"),
    ({"subnet": "my-subnet"}, "subnet id"),
    ({"kms_key_id": "alias/fruit"}, "key id or key ARN"),
    ({"output_prefix": "a/../b"}, "non-empty key prefix"),
])
def test_config_errors_are_clear(tmp_path, emr, message):
    with pytest.raises(FruitpipeError, match=re.escape(message)):
        load_emr_config(str(write_config(tmp_path / "c.yaml", **emr)), {})


def test_release_labels_spark_3_5_and_4_are_accepted_older_ones_refused_in_one_line(capsys, tmp_path):
    for label in ("emr-7.13.0", "emr-7.1.0", "emr-spark-8.0.0"):
        assert load_emr_config(None, {"release_label": label}).release_label == label
    spark4 = load_emr_config(None, {"release_label": "emr-spark-8.0.0", "bucket": "fruit-photos"})
    assert specs.cluster_request(spark4)["ReleaseLabel"] == "emr-spark-8.0.0"
    for label, reason in (("emr-7.0.0", "ships Python 3.9 only"), ("emr-6.15.0", "must be an EMR 7.x release")):
        assert cli.main(["emr", "up", "--dry-run", "--bucket", "fruit-photos", "--release-label", label]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err and "Traceback" not in err


def test_config_file_problems(tmp_path):
    with pytest.raises(FruitpipeError, match="does not exist"):
        load_emr_config(str(tmp_path / "missing.yaml"), {})
    (tmp_path / "broken.yaml").write_text("emr:\n  bucket: [unclosed\n")
    with pytest.raises(FruitpipeError, match="not valid YAML at line"):
        load_emr_config(str(tmp_path / "broken.yaml"), {})
    (tmp_path / "other.yaml").write_text("run:\n  mode: mini\n")
    assert load_emr_config(str(tmp_path / "other.yaml"), {}) == EmrConfig()
    assert load_emr_config(str(tmp_path / "other.yaml"), {"region": "us-east-1", "allow_other_region": True}).region \
        == "us-east-1"


# ------------------------------------------------------------------ pure builders


@pytest.mark.parametrize("instance_type", sorted(INSTANCE_TYPES))
def test_spark_sizing_fits_each_instance_type(instance_type):
    config = load_emr_config(None, {"core_instance_type": instance_type, "master_instance_type": instance_type,
                                    "core_instance_count": 3})
    props = specs.spark_properties(config)
    node = INSTANCE_TYPES[instance_type]
    heap, overhead = int(props["spark.executor.memory"][:-1]), int(props["spark.executor.memoryOverhead"][:-1])
    assert heap + overhead <= node.yarn_memory_mb - 1024
    assert overhead > heap >= 1024
    assert props["spark.executor.cores"] == str(node.vcpus) and props["spark.executor.instances"] == "3"
    assert int(props["spark.driver.memory"][:-1]) <= node.memory_gib * 1024 // 4
    assert props["spark.executorEnv.OMP_NUM_THREADS"] == "1"


def test_cluster_request_shape():
    config = load_emr_config(None, {"bucket": "fruit-photos", "spot": True, "key_pair": "me",
                                    "subnet": "subnet-0123456789abcdef0", "idle_timeout_s": 900})
    request = specs.cluster_request(config)
    master, core = request["Instances"]["InstanceGroups"]
    assert (master["Market"], core["Market"]) == ("ON_DEMAND", "SPOT")
    assert request["Instances"]["Ec2KeyName"] == "me" and request["Instances"]["Ec2SubnetId"].startswith("subnet-")
    assert request["Instances"]["KeepJobFlowAliveWhenNoSteps"] is True
    assert request["AutoTerminationPolicy"] == {"IdleTimeout": 900}
    assert request["Applications"] == [{"Name": "Spark"}] and request["VisibleToAllUsers"] is True
    assert request["BootstrapActions"][0]["ScriptBootstrapAction"]["Path"] == \
        "s3://fruit-photos/fruitpipe/code/bootstrap.sh"
    assert {"Key": "project", "Value": "fruitpipe"} in request["Tags"]
    env = request["Configurations"][1]["Configurations"][0]["Properties"]
    assert env == {"PYSPARK_PYTHON": specs.NODE_PYTHON, "PYSPARK_DRIVER_PYTHON": specs.NODE_PYTHON}
    without = specs.cluster_request(load_emr_config(None, {"bucket": "fruit-photos"}))
    assert "Ec2KeyName" not in without["Instances"] and "Ec2SubnetId" not in without["Instances"]


def test_bucket_requests_encrypt_with_kms_when_configured():
    config = load_emr_config(None, {"bucket": "fruit-photos", "kms_key_id": "1234abcd-12ab-34cd-56ef-1234567890ab"})
    requests = dict(specs.bucket_requests(config))
    rule = requests["put_bucket_encryption"]["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms" and rule["BucketKeyEnabled"]
    assert requests["create_bucket"]["CreateBucketConfiguration"] == {"LocationConstraint": "eu-west-1"}
    kms = specs.job_role_policy(config)["Statement"][-1]
    assert kms["Resource"] == "arn:aws:kms:eu-west-1:*:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def test_job_role_policy_is_limited_to_the_bucket_prefixes():
    config = load_emr_config(None, {"bucket": "fruit-photos", "output_prefix": "results"})
    statements = specs.job_role_policy(config)["Statement"]
    for statement in statements:
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        assert all(r == "arn:aws:s3:::fruit-photos" or r.startswith("arn:aws:s3:::fruit-photos/fruitpipe/")
                   or r.startswith("arn:aws:s3:::fruit-photos/results/") for r in resources), statement
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        assert all(a.startswith("s3:") and "*" not in a for a in actions)
    writes = [s for s in statements if "s3:PutObject" in s["Action"]]
    assert {s["Resource"] for s in writes} == {"arn:aws:s3:::fruit-photos/results/*",
                                                "arn:aws:s3:::fruit-photos/fruitpipe/logs/*"}


def test_run_step_passes_extra_arguments_after_the_run_arguments():
    step = specs.run_step("s3://b/in/", "s3://b/out/", "full", ["--batch-size", "8"], None)
    assert step["ActionOnFailure"] == "CONTINUE"
    assert step["HadoopJarStep"]["Args"][5:] == [specs.NODE_LAUNCHER, "run", "s3://b/in/", "s3://b/out/", "--mode",
                                                 "full", "--master", "yarn", "--batch-size", "8"]
    step = specs.run_step("s3://b/in/", "s3://b/out/", "full", ["--pca-k", "9"], None, model_file="s3://b/code/model")
    assert step["HadoopJarStep"]["Args"][-4:] == ["--model-file", "s3://b/code/model", "--pca-k", "9"]


# ------------------------------------------------------------------ cost


def test_price_table_covers_every_sizable_instance_type():
    assert set(prices.USD_PER_HOUR) == set(INSTANCE_TYPES)
    assert date.fromisoformat(prices.AS_OF) and prices.REGION == "eu-west-1" and prices.SOURCES
    assert all(ec2 > emr > 0 for ec2, emr in prices.USD_PER_HOUR.values())


def test_default_throughput_is_the_benchmarked_rate_with_its_safety_factor():
    benchmarks = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    measured = re.search(r"FULL fp32 \(the default[^|]*\| \*\*([\d.]+) img/s", benchmarks)
    day = re.search(r"\| date \| (\d{4}-\d{2}-\d{2}) \|", benchmarks)
    assert "**2 cores**" in benchmarks and measured and day and day.group(1) in cost.MEASURED_ON
    assert cost.MEASURED_IMAGES_PER_CORE_S == pytest.approx(float(measured.group(1)) / 2)
    assert 0 < cost.SAFETY_FACTOR < 1
    assert cost.DEFAULT_THROUGHPUT == pytest.approx(cost.MEASURED_IMAGES_PER_CORE_S * cost.SAFETY_FACTOR)
    config = load_emr_config(None, {"core_instance_count": 2})
    e = cost.estimate(config, images=90_000)
    assert e.measured and e.throughput == cost.DEFAULT_THROUGHPUT
    assert e.compute_h == pytest.approx(90_000 / (cost.DEFAULT_THROUGHPUT * 8) / 3600)
    assert not cost.estimate(config, images=90_000, throughput=10).measured


def test_cost_cli_prints_time_cost_and_cost_per_10k_images_in_both_currencies(capsys):
    assert cli.main(["emr", "cost", "--images", "90000"]) == 0
    out = capsys.readouterr().out
    assert (f"speed: {cost.DEFAULT_THROUGHPUT:.1f} images/s per executor vCPU (measured "
            f"{cost.MEASURED_IMAGES_PER_CORE_S:.2f} per core x safety factor 0.5; BENCHMARKS.md") in out
    config = load_emr_config(None, {})
    e = cost.estimate(config, images=90_000)
    minutes = round(e.compute_h * 60)
    assert f"time: 90,000 images on 8 executor vCPUs = {e.compute_h:.2f} h (0:{minutes:02d}), plus 0.20 h (0:12)" in out
    usd = e.usd_if_downed
    eur = usd * prices.EUR_PER_USD
    assert (f"right after the run: ${usd:.2f} (€{eur:.2f}), ${usd / 9:.4f} (€{eur / 9:.4f}) per 10k images") in out
    assert f"in USD as of {prices.AS_OF}, € at the table's fixed {prices.EUR_PER_USD:g} €/$" in out
    assert cli.main(["emr", "cost", "--images", "90000", "--throughput", "10"]) == 0
    assert "speed: 10.0 images/s per executor vCPU (--throughput)" in capsys.readouterr().out


def test_cost_estimate_arithmetic():
    config = load_emr_config(None, {"core_instance_count": 2, "idle_timeout_s": 3600})
    e = cost.estimate(config, images=288_000, throughput=10, startup_minutes=12)
    assert e.executor_vcpus == 8
    assert e.compute_h == pytest.approx(1.0)
    ec2, emr = prices.USD_PER_HOUR["m5.xlarge"]
    assert e.rate.ec2 == pytest.approx(3 * ec2) and e.rate.emr == pytest.approx(3 * emr)
    assert e.usd_if_downed == pytest.approx(1.2 * 3 * (ec2 + emr))
    assert e.usd_if_idle == pytest.approx(2.2 * 3 * (ec2 + emr))
    assert cost.usd_to_eur(10) == pytest.approx(10 * prices.EUR_PER_USD)
    assert cost.per_10k(2.0, 20_000) == f"$1.0000 (€{prices.EUR_PER_USD:.4f}) per 10k images"
    assert cost.hours(1.25) == "1.25 h (1:15)"
    text = cost.format_estimate(config, e)
    assert "288,000 images" in text and "1.00 h" in text and prices.AS_OF in text
    with pytest.raises(FruitpipeError, match="no price for x9.huge"):
        cost.hourly_rate([cost.NodeGroup("x9.huge", 1)])


# ------------------------------------------------------------------ waiting, bootstrap, redaction


def test_wait_for_prints_changes_and_stops_on_a_final_state(capsys):
    states = iter([("PENDING", ""), ("PENDING", ""), ("RUNNING", ""), ("FAILED", "Error; exit 1; s3://l/stderr.gz")])
    now = iter(range(100))
    final = commands.wait_for(lambda: next(states), done=("COMPLETED",), failed=("FAILED",), interval=0,
                              timeout=None, label="s-1", sleep=lambda _: None, clock=lambda: next(now))
    assert final == "FAILED"
    err = capsys.readouterr().err
    assert err.count("PENDING") == 1 and "RUNNING" in err and "exit 1; s3://l/stderr.gz" in err


def test_bootstrap_script_installs_the_locked_pins():
    pins = bootstrap.executor_pins(ROOT)
    locked = dict(line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    locked = {bootstrap.normalize(k): v for k, v in locked.items()}
    assert pins.requirements and all(r.split("==")[1] == locked[r.split("==")[0]] for r in pins.requirements)
    names = {r.split("==")[0] for r in pins.requirements}
    assert {"numpy", "pandas", "pyarrow", "onnxruntime", "pillow", "simplejpeg", "fsspec", "s3fs", "pyyaml"} <= names
    assert "pyspark" not in names and {"PIL", "yaml"} <= set(pins.imports)

    script = bootstrap.render_bootstrap(pins, "s3://fruit-photos/fruitpipe/code/fruitpipe-0.1.0-py3-none-any.whl")
    assert script.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in script
    assert "aws s3 cp --only-show-errors s3://fruit-photos/fruitpipe/code/fruitpipe-0.1.0-py3-none-any.whl" in script
    assert "--no-deps" in script and "numpy==" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    local = bootstrap.render_bootstrap(pins, "/tmp/dist/fruitpipe-0.1.0-py3-none-any.whl", root="/tmp/fp")
    assert "\ncp /tmp/dist/fruitpipe-0.1.0-py3-none-any.whl" in local and "aws s3" not in local
    with pytest.raises(FruitpipeError, match="not a wheel"):
        bootstrap.render_bootstrap(pins, "s3://b/fruitpipe.tar.gz")
    assert "dnf install -y -q python3.11 python3.11-pip" in script
    assert "--no-index" not in script and "wheelhouse" not in script


def test_offline_bootstrap_installs_from_the_wheelhouse_with_no_index():
    pins = bootstrap.executor_pins(ROOT)
    script = bootstrap.render_bootstrap(pins, "s3://fruit-photos/code/fruitpipe-0.1.0-py3-none-any.whl",
                                        wheelhouse_source="s3://fruit-photos/code/wheelhouse.tar")
    assert 'aws s3 cp --only-show-errors s3://fruit-photos/code/wheelhouse.tar "$ROOT/wheelhouse.tar"' in script
    installs = [line for line in script.splitlines() if "-m pip install" in line]
    assert len(installs) == 2 and all('--no-index --find-links "$ROOT/wheelhouse"' in line for line in installs)
    assert subprocess.run(["bash", "-n"], input=script, text=True, check=False).returncode == 0
    local = bootstrap.render_bootstrap(pins, "/tmp/dist/fruitpipe-0.1.0-py3-none-any.whl",
                                       wheelhouse_source="/tmp/dist/wheelhouse.tar")
    assert '\ncp /tmp/dist/wheelhouse.tar "$ROOT/wheelhouse.tar"' in local and "aws s3" not in local
    with pytest.raises(FruitpipeError, match="not a wheelhouse"):
        bootstrap.render_bootstrap(pins, "/tmp/dist/fruitpipe-0.1.0-py3-none-any.whl", wheelhouse_source="/tmp/w/")


def test_wheelhouse_download_targets_the_nodes_python_and_platform(tmp_path):
    pins = bootstrap.executor_pins(ROOT)
    command = bootstrap.wheelhouse_command(pins, tmp_path / "c.txt", tmp_path / "w")
    joined = " ".join(command)
    assert command[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in command
    assert "--python-version 3.11 --implementation cp" in joined and f"-c {tmp_path / 'c.txt'}" in joined
    platforms = [command[i + 1] for i, word in enumerate(command) if word == "--platform"]
    # Amazon Linux 2023 (glibc 2.34) runs manylinux2014 and every manylinux_2_x up to 2_34.
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
            "manylinux_2_34_x86_64"} <= set(platforms)
    assert not any(p.startswith("manylinux_2_35") for p in platforms)
    assert command[-len(pins.requirements):] == list(pins.requirements)
    host = bootstrap.wheelhouse_command(pins, tmp_path / "c.txt", tmp_path / "w", platforms=None)
    assert "--platform" not in host


def test_redact_hides_every_credential(aws_env):
    aws = client.Aws("eu-west-1")
    text = f"key {FAKE_ACCESS_KEY} secret {FAKE_SECRET_KEY} token {FAKE_SESSION_TOKEN}"
    assert aws.redact(text) == "key **** secret **** token ****"
