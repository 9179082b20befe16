"""Pure builders of the requests fruitpipe sends to AWS: plain data in, plain data out, no I/O.

Keeping them free of boto3 lets `--dry-run` print exactly what would be sent and lets tests check every
field without a network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config import EmrConfig
from .instances import INSTANCE_TYPES

# Where the bootstrap script puts fruitpipe on every node.
NODE_ROOT = "/opt/fruitpipe"
NODE_PYTHON = f"{NODE_ROOT}/venv/bin/python"
NODE_LAUNCHER = f"{NODE_ROOT}/launch.py"
NODE_RUN_CONFIG = "/home/hadoop/fruitpipe-run.yaml"

BOOTSTRAP_NAME = "bootstrap.sh"
RUN_CONFIG_NAME = "run.yaml"
# Folder under the code prefix holding the model artifact (feature_extractor.onnx + model.json) runs use.
MODEL_FOLDER = "model"

ACTIVE_CLUSTER_STATES = ("STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING", "TERMINATING")

# Room left on each core node for the YARN application master of a client-mode Spark job.
_AM_HEADROOM_MB = 1024
_HEAP_SHARE = 0.35


@dataclass(frozen=True)
class RoleSpec:
    """One of the IAM roles EMR needs, as `aws emr create-default-roles` makes it."""

    name: str
    service: str
    managed_policy_arn: str
    instance_profile: bool


def spark_properties(config: EmrConfig) -> dict[str, str]:
    """spark-defaults sized to the core instance type: one executor per core node using all its vCPUs.

    Each task runs one single-threaded ONNX session, so OMP_NUM_THREADS=1 and parallelism comes from
    tasks. Python workers live outside the JVM heap, so most of the container goes to memoryOverhead.
    """
    core = INSTANCE_TYPES[config.core_instance_type]
    master = INSTANCE_TYPES[config.master_instance_type]
    container_mb = core.yarn_memory_mb - _AM_HEADROOM_MB
    heap_mb = max(1024, _round_down(container_mb * _HEAP_SHARE))
    driver_mb = min(8192, _round_down(master.memory_gib * 1024 * 0.25))
    return {
        "spark.executor.instances": str(config.core_instance_count),
        "spark.executor.cores": str(core.vcpus),
        "spark.executor.memory": f"{heap_mb}m",
        "spark.executor.memoryOverhead": f"{container_mb - heap_mb}m",
        "spark.driver.memory": f"{driver_mb}m",
        "spark.dynamicAllocation.enabled": "false",
        "spark.executorEnv.OMP_NUM_THREADS": "1",
        "spark.pyspark.python": NODE_PYTHON,
        "spark.pyspark.driver.python": NODE_PYTHON,
    }


def _round_down(mb: float, step: int = 256) -> int:
    return int(mb) // step * step


def spark_configurations(config: EmrConfig) -> list[dict[str, Any]]:
    """EMR Configurations: spark-defaults plus the Python every Spark process must use."""
    return [
        {"Classification": "spark-defaults", "Properties": spark_properties(config)},
        {"Classification": "spark-env", "Properties": {}, "Configurations": [
            {"Classification": "export",
             "Properties": {"PYSPARK_PYTHON": NODE_PYTHON, "PYSPARK_DRIVER_PYTHON": NODE_PYTHON}},
        ]},
    ]


def cluster_request(config: EmrConfig) -> dict[str, Any]:
    """run_job_flow parameters: a Spark cluster that installs fruitpipe and ends itself when idle."""
    instances: dict[str, Any] = {
        "InstanceGroups": [
            {"Name": "master", "InstanceRole": "MASTER", "Market": "ON_DEMAND",
             "InstanceType": config.master_instance_type, "InstanceCount": config.master_instance_count},
            {"Name": "core", "InstanceRole": "CORE", "Market": "SPOT" if config.spot else "ON_DEMAND",
             "InstanceType": config.core_instance_type, "InstanceCount": config.core_instance_count},
        ],
        "KeepJobFlowAliveWhenNoSteps": True,
        "TerminationProtected": False,
    }
    if config.key_pair:
        instances["Ec2KeyName"] = config.key_pair
    if config.subnet:
        instances["Ec2SubnetId"] = config.subnet
    return {
        "Name": config.cluster_name,
        "ReleaseLabel": config.release_label,
        "LogUri": config.uri(config.logs_prefix) + "/",
        "Applications": [{"Name": "Spark"}],
        "Instances": instances,
        "BootstrapActions": [{"Name": "install fruitpipe",
                              "ScriptBootstrapAction": {"Path": config.uri(config.code_prefix, BOOTSTRAP_NAME),
                                                        "Args": []}}],
        "Configurations": spark_configurations(config),
        "JobFlowRole": config.instance_profile,
        "ServiceRole": config.service_role,
        "VisibleToAllUsers": True,
        "AutoTerminationPolicy": {"IdleTimeout": config.idle_timeout_s},
        "Tags": [{"Key": k, "Value": v} for k, v in config.all_tags().items()],
    }


def run_step(source: str, output: str, mode: str, run_args: list[str], node_config: str | None,
             model_file: str | None = None) -> dict[str, Any]:
    """add_job_flow_steps entry running `fruitpipe run` through spark-submit on the master node.

    ``model_file`` is the uploaded model artifact: with it the node runs the exported ONNX model and never needs
    torch, which the bootstrap does not install.
    """
    args = ["spark-submit", "--master", "yarn", "--deploy-mode", "client", NODE_LAUNCHER]
    if node_config:
        args += ["--config", node_config]
    args += ["run", source, output, "--mode", mode, "--master", "yarn"]
    if model_file:
        args += ["--model-file", model_file]
    args += run_args
    return {"Name": f"fruitpipe run --mode {mode}", "ActionOnFailure": "CONTINUE",
            "HadoopJarStep": {"Jar": "command-runner.jar", "Args": args}}


def fetch_config_step(config_uri: str) -> dict[str, Any]:
    """A step copying the uploaded run config onto the master; the run step after it is cancelled if it fails."""
    return {"Name": "fetch fruitpipe run config", "ActionOnFailure": "CANCEL_AND_WAIT",
            "HadoopJarStep": {"Jar": "command-runner.jar",
                              "Args": ["aws", "s3", "cp", "--only-show-errors", config_uri, NODE_RUN_CONFIG]}}


def bucket_requests(config: EmrConfig) -> list[tuple[str, dict[str, Any]]]:
    """(operation, parameters) creating a private, default-encrypted bucket tagged project=fruitpipe."""
    bucket = config.require_bucket()
    create: dict[str, Any] = {"Bucket": bucket, "ObjectOwnership": "BucketOwnerEnforced"}
    if config.region != "us-east-1":
        create["CreateBucketConfiguration"] = {"LocationConstraint": config.region}
    if config.kms_key_id:
        default = {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": config.kms_key_id}
    else:
        default = {"SSEAlgorithm": "AES256"}
    return [
        ("create_bucket", create),
        ("put_public_access_block", {"Bucket": bucket, "PublicAccessBlockConfiguration": {
            "BlockPublicAcls": True, "IgnorePublicAcls": True,
            "BlockPublicPolicy": True, "RestrictPublicBuckets": True}}),
        ("put_bucket_encryption", {"Bucket": bucket, "ServerSideEncryptionConfiguration": {"Rules": [
            {"ApplyServerSideEncryptionByDefault": default, "BucketKeyEnabled": bool(config.kms_key_id)}]}}),
        ("put_bucket_tagging", {"Bucket": bucket, "Tagging": {
            "TagSet": [{"Key": k, "Value": v} for k, v in config.all_tags().items()]}}),
    ]


def job_role_policy(config: EmrConfig) -> dict[str, Any]:
    """Least-privilege IAM policy for the cluster's instance profile: only fruitpipe's prefixes of its bucket."""
    bucket_arn = f"arn:aws:s3:::{config.require_bucket()}"
    prefixes = [config.code_prefix, config.input_prefix, config.output_prefix, config.logs_prefix]
    statements: list[dict[str, Any]] = [
        {"Sid": "ListFruitpipePrefixes", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": bucket_arn,
         "Condition": {"StringLike": {"s3:prefix": [form for p in prefixes for form in (p, f"{p}/", f"{p}/*")]}}},
        {"Sid": "LocateBucket", "Effect": "Allow", "Action": "s3:GetBucketLocation", "Resource": bucket_arn},
        {"Sid": "ReadCodeAndInput", "Effect": "Allow", "Action": "s3:GetObject",
         "Resource": [f"{bucket_arn}/{config.code_prefix}/*", f"{bucket_arn}/{config.input_prefix}/*"]},
        {"Sid": "WriteOutput", "Effect": "Allow",
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                    "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
         "Resource": f"{bucket_arn}/{config.output_prefix}/*"},
        {"Sid": "WriteLogs", "Effect": "Allow", "Action": "s3:PutObject",
         "Resource": f"{bucket_arn}/{config.logs_prefix}/*"},
    ]
    if config.kms_key_id:
        key = config.kms_key_id
        key_arn = key if key.startswith("arn:") else f"arn:aws:kms:{config.region}:*:key/{key}"
        statements.append({"Sid": "UseBucketKey", "Effect": "Allow",
                           "Action": ["kms:Decrypt", "kms:GenerateDataKey"], "Resource": key_arn})
    return {"Version": "2012-10-17", "Statement": statements}


def default_roles(config: EmrConfig) -> list[RoleSpec]:
    """The service role and instance-profile role named in the config, with EMR's default managed policies."""
    return [
        RoleSpec(config.service_role, "elasticmapreduce.amazonaws.com",
                 "arn:aws:iam::aws:policy/service-role/AmazonElasticMapReduceRole", instance_profile=False),
        RoleSpec(config.instance_profile, "ec2.amazonaws.com",
                 "arn:aws:iam::aws:policy/service-role/AmazonElasticMapReduceforEC2Role", instance_profile=True),
    ]


def trust_policy(service: str) -> str:
    """Assume-role policy document letting one AWS service use the role."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}]})
