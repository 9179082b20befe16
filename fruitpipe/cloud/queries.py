"""Look-ups in S3, IAM, STS, Service Quotas and EMR that return data and print nothing.

The commands (`commands.py`, `audit.py`) decide what to print and which exit status to give; here live only
the reads, each answering one question, with AWS's "not found" error codes turned into False or None.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from typing import Any

from fruitpipe.errors import FruitpipeError

from . import specs
from .client import Aws, AwsError
from .config import EmrConfig

_CLUSTER_ID = re.compile(r"^j-[0-9A-Z]{8,20}$")
# What S3 and IAM answer for something that does not exist (HEAD requests have no body, hence the bare 404).
_NO_OBJECT = ("404", "NoSuchKey", "NotFound")
_NO_IAM_ENTITY = ("NoSuchEntity",)


def _read_or_none(aws: Aws, service: str, operation: str, missing: Collection[str],
                  **params: Any) -> dict[str, Any] | None:
    """The response, or None when AWS answers with one of the ``missing`` error codes."""
    try:
        return aws.read(service, operation, **params)
    except AwsError as exc:
        if exc.code in missing:
            return None
        raise


def items(aws: Aws, service: str, operation: str, key: str, **params: Any) -> list[dict[str, Any]]:
    """The ``key`` entries of every page of a paginated read."""
    return [item for page in aws.pages(service, operation, **params) for item in page.get(key, [])]


def caller_identity(aws: Aws) -> dict[str, Any]:
    """STS's answer for these credentials: Account and Arn (never a key)."""
    return aws.read("sts", "get_caller_identity")


# ---------------------------------------------------------------- S3


def split_s3(uri: str) -> tuple[str, str]:
    """('bucket', 'key/prefix') of an s3:// URI (EMR's s3n:// and s3a:// spellings accepted)."""
    match = re.match(r"^s3[an]?://([^/]+)/?(.*)$", uri)
    if not match:
        raise FruitpipeError(f"{uri} is not an s3:// URI")
    return match.group(1), match.group(2)


def bucket_exists(aws: Aws, bucket: str) -> bool:
    """Whether the bucket exists; one this account may not use is an error, since bucket names are global."""
    try:
        aws.read("s3", "head_bucket", Bucket=bucket)
    except AwsError as exc:
        if exc.code in ("404", "NoSuchBucket", "NotFound"):
            return False
        if exc.code in ("403", "AccessDenied"):
            raise FruitpipeError(f"s3://{bucket} exists but this account may not use it; bucket names are "
                                 "global, so choose another emr.bucket") from None
        raise
    return True


def bucket_region(aws: Aws, bucket: str) -> str:
    """The bucket's region (S3 reports us-east-1 as no constraint and old eu-west-1 buckets as EU)."""
    location = aws.read("s3", "get_bucket_location", Bucket=bucket).get("LocationConstraint")
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(location, location)


def public_access_blocked(aws: Aws, bucket: str) -> bool:
    """Whether all four public-access blocks are on."""
    response = _read_or_none(aws, "s3", "get_public_access_block", ("NoSuchPublicAccessBlockConfiguration",),
                             Bucket=bucket)
    if response is None:
        return False
    block = response["PublicAccessBlockConfiguration"]
    return all(block.get(k) for k in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy",
                                      "RestrictPublicBuckets"))


def default_encryption(aws: Aws, bucket: str) -> str | None:
    """The bucket's default encryption algorithm (AES256, aws:kms), or None without one."""
    response = _read_or_none(aws, "s3", "get_bucket_encryption", ("ServerSideEncryptionConfigurationNotFoundError",),
                             Bucket=bucket)
    rules = response["ServerSideEncryptionConfiguration"]["Rules"] if response else []
    return rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] if rules else None


def object_exists(aws: Aws, uri: str) -> bool:
    bucket, key = split_s3(uri)
    return _read_or_none(aws, "s3", "head_object", _NO_OBJECT, Bucket=bucket, Key=key) is not None


def object_bytes(aws: Aws, uri: str) -> bytes | None:
    """The object's bytes, or None when there is no object at ``uri``."""
    bucket, key = split_s3(uri)
    response = _read_or_none(aws, "s3", "get_object", _NO_OBJECT, Bucket=bucket, Key=key)
    return None if response is None else response["Body"].read()


def object_chunks(aws: Aws, bucket: str, key: str, size: int = 1 << 20) -> Iterator[bytes]:
    """The object's bytes in chunks of ``size``, so a large output file is never whole in memory."""
    yield from aws.read("s3", "get_object", Bucket=bucket, Key=key)["Body"].iter_chunks(size)


def objects(aws: Aws, bucket: str, prefix: str = "") -> Iterator[dict[str, Any]]:
    """The objects (Key, Size, ...) under ``prefix``, page by page as S3 lists them."""
    for page in aws.pages("s3", "list_objects_v2", Bucket=bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def keys(aws: Aws, bucket: str, prefix: str) -> Iterator[str]:
    """The keys of the files under ``prefix`` (folder markers, keys ending in /, left out)."""
    return (item["Key"] for item in objects(aws, bucket, prefix) if not item["Key"].endswith("/"))


# ---------------------------------------------------------------- IAM and quotas


def role_exists(aws: Aws, name: str) -> bool:
    return _read_or_none(aws, "iam", "get_role", _NO_IAM_ENTITY, RoleName=name) is not None


def instance_profile_roles(aws: Aws, name: str) -> list[str] | None:
    """The role names in the instance profile, or None when there is no such profile."""
    response = _read_or_none(aws, "iam", "get_instance_profile", _NO_IAM_ENTITY, InstanceProfileName=name)
    return None if response is None else [r["RoleName"] for r in response["InstanceProfile"].get("Roles", [])]


def ec2_quota(aws: Aws, quota_code: str) -> float:
    """The account's value of one EC2 Service Quotas code in this region (0 when AWS gives none)."""
    quota = aws.read("service-quotas", "get_service_quota", ServiceCode="ec2", QuotaCode=quota_code)["Quota"]
    return quota.get("Value", 0)


# ---------------------------------------------------------------- EMR


def cluster(aws: Aws, cluster_id: str) -> dict[str, Any]:
    """DescribeCluster's Cluster: name, status with its timeline, LogUri, ..."""
    return aws.read("emr", "describe_cluster", ClusterId=cluster_id)["Cluster"]


def clusters(aws: Aws, active_only: bool) -> list[dict[str, Any]]:
    """The clusters of this region, or only those not terminated."""
    states = {"ClusterStates": list(specs.ACTIVE_CLUSTER_STATES)} if active_only else {}
    return items(aws, "emr", "list_clusters", "Clusters", **states)


def instance_groups(aws: Aws, cluster_id: str) -> list[dict[str, Any]]:
    return aws.read("emr", "list_instance_groups", ClusterId=cluster_id)["InstanceGroups"]


def steps(aws: Aws, cluster_id: str) -> list[dict[str, Any]]:
    """The cluster's steps, newest first, as EMR lists them."""
    return aws.read("emr", "list_steps", ClusterId=cluster_id)["Steps"]


def cluster_state(aws: Aws, cluster_id: str) -> tuple[str, str]:
    """(state, reason) of the cluster."""
    status = cluster(aws, cluster_id)["Status"]
    return status["State"], status.get("StateChangeReason", {}).get("Message", "")


def step_state(aws: Aws, cluster_id: str, step_id: str) -> tuple[str, str]:
    """(state, failure reason, message and log file) of one step."""
    status = aws.read("emr", "describe_step", ClusterId=cluster_id, StepId=step_id)["Step"]["Status"]
    failure = status.get("FailureDetails") or {}
    detail = "; ".join(str(failure[k]) for k in ("Reason", "Message", "LogFile") if failure.get(k))
    return status["State"], detail


def resolve_cluster(aws: Aws, config: EmrConfig, explicit: str | None, active_only: bool) -> str:
    """The cluster a command acts on: ``explicit``, else the one active cluster named emr.cluster_name.

    Without ``active_only`` the newest cluster of that name is used when none is active.
    """
    if explicit:
        if not _CLUSTER_ID.match(explicit):
            raise FruitpipeError(f"{explicit} is not an EMR cluster id such as j-2AXXXXXXGAPLF")
        return explicit
    named = [c for c in clusters(aws, active_only) if c["Name"] == config.cluster_name]
    active = [c for c in named if c["Status"]["State"] in specs.ACTIVE_CLUSTER_STATES]
    if len(active) > 1:
        raise FruitpipeError(f"{len(active)} active clusters are named {config.cluster_name}: "
                             f"{', '.join(c['Id'] for c in active)}; pass --cluster")
    if active:
        return active[0]["Id"]
    if named and not active_only:
        return max(named, key=lambda c: c["Status"]["Timeline"]["CreationDateTime"])["Id"]
    raise FruitpipeError(f"no {'active ' if active_only else ''}cluster named {config.cluster_name} in "
                         f"{config.region}: start one with `fruitpipe emr up` or pass --cluster")
