"""Run configuration: a frozen dataclass built from a YAML file (defaults) and flags (overrides), validated once.

The resolved configuration is written next to the outputs; values that look like secrets never are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from fruitpipe.errors import FruitpipeError

MODES = ("mini", "apples", "full")
PRECISIONS = ("fp32", "int8")
SPLITS = ("Training", "Test")
MINI_IMAGES = 300
MAX_AUTO_SHARD_SIZE = 1024
MIN_AUTO_SHARDS = 8
APPLE_CLASSES = ("Apple*",)
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fruitpipe")
_SECRET_KEY_PATTERN = re.compile(r"secret|password|token|credential|access[._-]?key|session", re.IGNORECASE)


@dataclass(frozen=True)
class Selection:
    """Which listed images a run takes; the modes are presets of these fields."""

    split: str = "Training"
    classes: tuple[str, ...] = ()
    per_class: int | None = None
    limit: int | None = None


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes and where it goes."""

    source: str
    output: str
    mode: str = "full"
    split: str = "Training"
    classes: tuple[str, ...] = ()
    per_class: int | None = None
    limit: int | None = None
    model: str = "efficientnet_lite0"
    weights: str | None = None
    image_size: int | None = None
    precision: str = "fp32"
    # A model artifact (`fruitpipe export-model`): it decides model, weights, precision and input size, and a run
    # from it needs no torch.
    model_file: str | None = None
    # Small batches keep a 224 px CNN's activations in the CPU cache: on 2 EPYC cores ONNX Runtime runs
    # EfficientNet-Lite0 at 368 img/s with batch 2 and 233 img/s with batch 32 (BENCHMARKS.md).
    batch_size: int = 2
    # None: auto_shard_size() of the selected image count.
    shard_size: int | None = None
    threads_per_task: int = 1
    pca_k: int | None = 50
    pca_variance: float | None = None
    features_csv: bool = False
    # None: the master spark-submit was given when it started this process, else local[*].
    master: str | None = None
    spark_conf: Mapping[str, str] = field(default_factory=dict)
    read_timeout_s: float = 60.0
    overwrite: bool = False
    quiet: bool = False
    cache_dir: str = DEFAULT_CACHE_DIR

    def selection(self) -> Selection:
        """The mode preset combined with the explicit selection flags (flags win)."""
        classes = self.classes or (APPLE_CLASSES if self.mode == "apples" else ())
        limit = self.limit if self.limit is not None else (MINI_IMAGES if self.mode == "mini" else None)
        return Selection(split=self.split, classes=tuple(classes), per_class=self.per_class, limit=limit)

    def validate(self) -> RunConfig:
        """Raise FruitpipeError with one clear sentence for the first invalid value; return self."""
        if not self.source:
            raise FruitpipeError("no source given: pass the folder or URI that holds Training/<class>/*.jpg")
        if not self.output:
            raise FruitpipeError("no output given: pass the folder or URI to write the run to")
        if self.mode not in MODES:
            raise FruitpipeError(f"unknown mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.split not in SPLITS:
            raise FruitpipeError(f"unknown split {self.split!r}: choose one of {', '.join(SPLITS)}")
        for name in ("per_class", "limit", "image_size", "batch_size", "shard_size", "threads_per_task"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise FruitpipeError(f"{_flag(name)} must be a positive integer, got {value!r}")
        if self.precision not in PRECISIONS:
            raise FruitpipeError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.model_file is not None and not self.model_file.strip():
            raise FruitpipeError("--model-file must not be empty: pass the folder `fruitpipe export-model` wrote")
        if self.image_size is not None and self.image_size < 32:
            raise FruitpipeError(f"--image-size must be at least 32 pixels, got {self.image_size}")
        if self.pca_variance is not None:
            if not isinstance(self.pca_variance, (int, float)) or not 0 < self.pca_variance <= 1:
                raise FruitpipeError(f"--pca-variance must be in (0, 1], got {self.pca_variance!r}")
        elif self.pca_k is None or not isinstance(self.pca_k, int) or isinstance(self.pca_k, bool) or self.pca_k < 1:
            raise FruitpipeError(f"--pca-k must be a positive integer, got {self.pca_k!r}")
        if not isinstance(self.read_timeout_s, (int, float)) or self.read_timeout_s <= 0:
            raise FruitpipeError(f"--read-timeout must be a positive number of seconds, got {self.read_timeout_s!r}")
        if self.master is not None and not self.master.strip():
            raise FruitpipeError("--master must not be empty (default: local[*])")
        return self

    def fingerprint(self, weights_sha256: str, input_size: int, onnx_sha256: str) -> str:
        """What the stored features depend on: a different value means an existing OUT cannot be resumed.

        The ONNX bytes count, not where they came from: a run from an artifact and a run exporting the same
        bytes resume each other.
        """
        selection = dataclasses.asdict(self.selection())
        identity = {"source": self.source.rstrip("/"), "selection": selection, "model": self.model,
                    "weights_sha256": weights_sha256, "input_size": input_size, "shard_size": self.shard_size,
                    "precision": self.precision, "onnx_sha256": onnx_sha256}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    def to_public_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data, with secret-looking Spark settings redacted."""
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        data["spark_conf"] = {key: ("***" if _SECRET_KEY_PATTERN.search(key) else value)
                              for key, value in dict(self.spark_conf).items()}
        return data


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def load_yaml(path: str | None) -> dict[str, Any]:
    """The YAML config file as a mapping (empty when no file is given)."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise FruitpipeError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise FruitpipeError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FruitpipeError(f"config file {path} must hold a mapping of option: value")
    return data


def build_config(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> RunConfig:
    """File values as defaults, non-None overrides on top; unknown keys and wrong types are clear errors."""
    merged: dict[str, Any] = {}
    for key, value in file_values.items():
        if key == "emr":
            continue
        normalised = key.replace("-", "_")
        if normalised not in _FIELDS:
            raise FruitpipeError(f"unknown option {key!r} in config file; known: {', '.join(sorted(_FIELDS))}")
        merged[normalised] = value
    merged.update({key: value for key, value in overrides.items() if value is not None})
    for key in ("source", "output"):
        merged[key] = absolute_if_local(merged.get(key) or "")
    if "classes" in merged:
        classes = merged["classes"]
        merged["classes"] = (classes,) if isinstance(classes, str) else tuple(classes or ())
    if "spark_conf" in merged and not isinstance(merged["spark_conf"], Mapping):
        raise FruitpipeError("spark_conf must be a mapping of Spark setting: value")
    _check_types(merged)
    return RunConfig(**merged).validate()


def auto_shard_size(images: int) -> int:
    """The default shard size: at most MAX_AUTO_SHARD_SIZE images, and at least MIN_AUTO_SHARDS shards, so a small
    run still spreads over the cores. It depends on the image count alone, so the same command resumes."""
    return max(1, min(MAX_AUTO_SHARD_SIZE, math.ceil(images / MIN_AUTO_SHARDS)))


def absolute_if_local(location: str) -> str:
    """A local path made absolute here, on the driver: executors on a cluster resolve a relative path against their
    own working directory. URIs (s3://, file://, ...) and "" stay as they are."""
    if not location or "://" in location:
        return location
    return os.path.abspath(os.path.expanduser(location))


def _check_types(values: Mapping[str, Any]) -> None:
    expected = {"batch_size": int, "shard_size": int, "threads_per_task": int, "per_class": int, "limit": int,
                "image_size": int, "pca_k": int, "pca_variance": (int, float), "read_timeout_s": (int, float),
                "features_csv": bool, "overwrite": bool, "quiet": bool, "source": str, "output": str,
                "mode": str, "split": str, "model": str, "weights": str, "precision": str, "model_file": str, "master": str,
                "cache_dir": str}
    for key, kind in expected.items():
        value = values.get(key)
        if value is None:
            continue
        wrong_bool = isinstance(value, bool) and kind in (int, (int, float))
        if wrong_bool or not isinstance(value, kind):
            raise FruitpipeError(f"option {key} has the wrong type: {value!r}")


def parse_spark_conf(pairs: list[str] | None) -> dict[str, str]:
    """`--spark-conf key=value` flags as a mapping."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FruitpipeError(f"--spark-conf expects key=value, got {pair!r}")
        result[key.strip()] = value.strip()
    return result
