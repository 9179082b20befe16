"""The `emr:` section of fruitpipe's YAML config: where things live on AWS and what the cluster looks like."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from fruitpipe.config import check_field_types, field_types
from fruitpipe.errors import FruitpipeError

from .instances import INSTANCE_TYPES

PROJECT_TAG = ("project", "fruitpipe")

_REGION = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RELEASE = re.compile(r"^emr-(?:7\.(?P<minor>\d+)\.\d+|spark-8\.\d+\.\d+)$")

# The newest EMR 7.x release: Spark 3.5.6-amzn-2, Python 3.9 and 3.11 on Amazon Linux 2023, released 2026-04-21.
# Source: EMR Release Guide, "Amazon EMR release 7.13.0" (emr-7130-release.html) and "Spark release history"
# (Spark-release-history.html), read 2026-11. emr-spark-8.0.0 (Spark 4.0.2, Python 3.11-3.13) is the Spark 4 line.
DEFAULT_RELEASE = "emr-7.13.0"
# emr-7.0.0 ships Python 3.9 only; every release from emr-7.1.0 on also ships python3.11, which the nodes need
# (Release Guide, "Application versions in Amazon EMR 7.x releases", emr-release-app-versions-7.x.html).
FIRST_7X_MINOR_WITH_PYTHON311 = 1
_SUBNET = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_PREFIX = re.compile(r"^[A-Za-z0-9!_.*'()/-]+$")


@dataclass(frozen=True)
class EmrConfig:
    """Validated EMR settings; built only by :func:`load_emr_config`."""

    region: str = "eu-west-1"
    allow_other_region: bool = False
    bucket: str | None = None
    code_prefix: str = "fruitpipe/code"
    input_prefix: str = "fruitpipe/input"
    output_prefix: str = "fruitpipe/output"
    logs_prefix: str = "fruitpipe/logs"
    release_label: str = DEFAULT_RELEASE
    cluster_name: str = "fruitpipe"
    master_instance_type: str = "m5.xlarge"
    master_instance_count: int = 1
    core_instance_type: str = "m5.xlarge"
    core_instance_count: int = 2
    spot: bool = False
    key_pair: str | None = None
    subnet: str | None = None
    idle_timeout_s: int = 3600
    tags: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    service_role: str = "EMR_DefaultRole"
    instance_profile: str = "EMR_EC2_DefaultRole"
    kms_key_id: str | None = None

    def require_bucket(self) -> str:
        """The bucket, or a clear error for the commands that cannot work without one."""
        if not self.bucket:
            raise FruitpipeError("no S3 bucket configured: set emr.bucket in the --config file or pass --bucket")
        return self.bucket

    def uri(self, prefix: str, *parts: str) -> str:
        """s3:// URI of ``parts`` below one of the configured prefixes."""
        return "s3://" + "/".join([self.require_bucket(), prefix, *parts])

    def all_tags(self) -> dict[str, str]:
        """The user's tags plus project=fruitpipe, which `audit` and the cost report rely on."""
        return {**self.tags, PROJECT_TAG[0]: PROJECT_TAG[1]}


# The tags mapping is checked by _check_tags, which can say what its keys and values must be.
_FIELD_TYPES = field_types(EmrConfig, checked_elsewhere=frozenset({Mapping[str, str]}))


def load_emr_config(path: str | None, overrides: Mapping[str, Any]) -> EmrConfig:
    """Reads the `emr:` section of the YAML at ``path`` (if any), applies non-None ``overrides``, validates."""
    values: dict[str, Any] = dict(_read_section(path)) if path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        raise FruitpipeError(f"unknown emr setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_FIELD_TYPES))}")
    check_field_types(values, _FIELD_TYPES, prefix="emr.")
    if "tags" in values:
        _check_tags(values["tags"])
        values["tags"] = MappingProxyType({str(k): str(v) for k, v in values["tags"].items()})
    for name in ("code_prefix", "input_prefix", "output_prefix", "logs_prefix"):
        if name in values:
            values[name] = values[name].strip("/")
    config = EmrConfig(**values)
    _validate(config)
    return config


def _read_section(path: str) -> Mapping[str, Any]:
    file = Path(path)
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FruitpipeError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise FruitpipeError(f"config file {path} is not valid YAML{where}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise FruitpipeError(f"config file {path} must be a YAML mapping")
    section = document.get("emr") or {}
    if not isinstance(section, dict):
        raise FruitpipeError(f"the emr section of {path} must be a mapping of settings")
    return section


def _check_tags(tags: object) -> None:
    if not (isinstance(tags, Mapping) and all(isinstance(key, str) and isinstance(value, (str, int, float))
                                              for key, value in tags.items())):
        raise FruitpipeError("emr.tags must be a mapping of tag names to values")


def _validate(c: EmrConfig) -> None:
    if not _REGION.match(c.region):
        raise FruitpipeError(f"emr.region {c.region!r} is not an AWS region name such as eu-west-1")
    if not c.region.startswith("eu-") and not c.allow_other_region:
        raise FruitpipeError(f"emr.region {c.region} is outside the EU; fruitpipe keeps photos in the EU unless "
                             "emr.allow_other_region is true")
    if c.bucket is not None and (not _BUCKET.match(c.bucket) or ".." in c.bucket):
        raise FruitpipeError(f"emr.bucket {c.bucket!r} is not a valid S3 bucket name (3-63 characters: "
                             "lower-case letters, digits, dots, hyphens; give the name, not an s3:// URI)")
    for name in ("code_prefix", "input_prefix", "output_prefix", "logs_prefix"):
        prefix = getattr(c, name)
        if not prefix or not _PREFIX.match(prefix) or ".." in prefix.split("/") or "//" in prefix:
            raise FruitpipeError(f"emr.{name} {prefix!r} must be a non-empty key prefix such as fruitpipe/code")
    release = _RELEASE.match(c.release_label)
    if not release:
        raise FruitpipeError(f"emr.release_label {c.release_label!r} must be an EMR 7.x release such as "
                             f"{DEFAULT_RELEASE} (or an emr-spark-8.x release such as emr-spark-8.0.0)")
    if release["minor"] is not None and int(release["minor"]) < FIRST_7X_MINOR_WITH_PYTHON311:
        raise FruitpipeError(f"emr.release_label {c.release_label} ships Python 3.9 only and fruitpipe's nodes need "
                             f"python3.11: use emr-7.{FIRST_7X_MINOR_WITH_PYTHON311}.0 or newer "
                             f"(default {DEFAULT_RELEASE})")
    for name in ("master_instance_type", "core_instance_type"):
        if getattr(c, name) not in INSTANCE_TYPES:
            raise FruitpipeError(f"emr.{name} {getattr(c, name)!r} is not one fruitpipe can size and price; "
                                 f"choose one of {', '.join(INSTANCE_TYPES)}")
    if c.master_instance_count not in (1, 3):
        raise FruitpipeError("emr.master_instance_count must be 1, or 3 for a highly available master")
    if c.core_instance_count < 1:
        raise FruitpipeError("emr.core_instance_count must be at least 1: core nodes run the Spark executors")
    if not 60 <= c.idle_timeout_s <= 604800:
        raise FruitpipeError("emr.idle_timeout_s must be between 60 s and 604800 s (7 days), as EMR requires")
    if c.subnet is not None and not _SUBNET.match(c.subnet):
        raise FruitpipeError(f"emr.subnet {c.subnet!r} must be a subnet id such as subnet-0123456789abcdef0")
    if c.kms_key_id is not None and (not c.kms_key_id or c.kms_key_id.startswith("alias/")):
        raise FruitpipeError("emr.kms_key_id must be a KMS key id or key ARN (an alias cannot be granted in the "
                             "job-role policy)")
    if not c.cluster_name or len(c.cluster_name) > 256:
        raise FruitpipeError("emr.cluster_name must be 1 to 256 characters")
    for key, value in c.tags.items():
        if key == PROJECT_TAG[0]:
            raise FruitpipeError("emr.tags must not set 'project': fruitpipe tags everything project=fruitpipe")
        if not 1 <= len(key) <= 128 or len(value) > 256 or key.startswith("aws:"):
            raise FruitpipeError(f"emr.tags {key!r}: keys are 1-128 characters not starting with aws:, "
                                 "values at most 256")
