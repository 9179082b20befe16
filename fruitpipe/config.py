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
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from fruitpipe.errors import FruitpipeError

MODES = ("mini", "apples", "full")
# What a run computes in: bf16 is an fp32 model run in bf16 (OpenVINO, CPUs with native bf16), int8 a quantized one.
PRECISIONS = ("fp32", "bf16", "int8")
# What a model graph (an artifact) holds.
MODEL_PRECISIONS = ("fp32", "int8")
AUTO_RUNTIME = "auto"
RUNTIMES = (AUTO_RUNTIME, "onnxruntime", "openvino")
AUTO_ENGINE, SPARK_ENGINE, LOCAL_ENGINE = ENGINES = ("auto", "spark", "local")
SPLITS = ("Training", "Test")
MINI_IMAGES = 300
# Up to this many listed images a run's CSV copies are one file per table: the Fruits-360 scale (90 k images) still
# gets one file, which pandas or a spreadsheet opens whole (pca.csv at k = 50 is about 70 MB for 100 k images), and
# the driver streams it from the parts in seconds. A larger run keeps a folder of parts per table (features.csv
# alone would be about 1.5 GB per 100 k images), unless csv_merged asks for one file.
CSV_SINGLE_FILE_MAX_IMAGES = 100_000
MAX_AUTO_SHARD_SIZE = 1024
MIN_AUTO_SHARDS = 8
APPLE_CLASSES = ("Apple*",)
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fruitpipe")
DEFAULT_PCA_K = 50
_SECRET_KEY_PATTERN = re.compile(r"secret|password|token|credential|access[._-]?key|session", re.IGNORECASE)
# A value shaped like a key or token (20+ letters, digits and base64 signs, with a digit): never echoed in a message.
_SECRET_VALUE_PATTERN = re.compile(r"^(?=.*\d)[A-Za-z0-9/+=_-]{20,}$")
# What Spark accepts as a master (SparkSubmit refuses anything else with a Java stack trace).
_MASTER_PATTERN = re.compile(r"^(local(\[[^\]]+\])?|local-cluster\[[^\]]+\]|yarn|(spark|k8s|mesos)://\S+)$")
# Spark settings holding a JVM size; a malformed one stops the JVM before fruitpipe could explain it.
_MEMORY_SETTING = re.compile(r"^spark\.(driver|executor)\.(memory|memoryOverhead)$|^spark\.driver\.maxResultSize$")
_MEMORY_SIZE = re.compile(r"^\d+([kmgtp]b?|b)?$", re.IGNORECASE)


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
    # auto: the fastest installed runtime for this model and precision on this machine's CPU (fruitpipe.runtimes).
    runtime: str = AUTO_RUNTIME
    # A model artifact (`fruitpipe export-model`): it decides model, weights, precision and input size, and a run
    # from it needs no torch.
    model_file: str | None = None
    # Small batches keep a 224 px CNN's activations in the CPU cache: on 2 EPYC cores ONNX Runtime runs
    # EfficientNet-Lite0 at 368 img/s with batch 2 and 233 img/s with batch 32 (BENCHMARKS.md).
    batch_size: int = 2
    # None: auto_shard_size() of the selected image count.
    shard_size: int | None = None
    threads_per_task: int = 1
    # None: DEFAULT_PCA_K unless pca_variance is given (resolved in __post_init__); giving both is an error.
    pca_k: int | None = None
    pca_variance: float | None = None
    features_csv: bool = False
    # One CSV file per table (csv/<table>.csv) however large the run; by default only a run of at most
    # CSV_SINGLE_FILE_MAX_IMAGES images gets them, a larger one keeps a folder of parts per table.
    csv_merged: bool = False
    # None: the master spark-submit was given when it started this process, else local[*].
    master: str | None = None
    spark_conf: Mapping[str, str] = field(default_factory=dict)
    # Where the tasks run: spark (any master), local (a process pool on this machine: no JVM, small runs start in
    # seconds) or auto: local for a small run on a local master, else spark (fruitpipe.distributors).
    engine: str = AUTO_ENGINE
    read_timeout_s: float = 60.0
    # Loads of an image that time out are tried this many times in all before the image is left for the next run.
    read_attempts: int = 3
    overwrite: bool = False
    quiet: bool = False
    cache_dir: str = DEFAULT_CACHE_DIR

    def __post_init__(self) -> None:
        # The default k applies only when no variance target is given, so an explicit k beside one is detectable.
        if self.pca_k is None and self.pca_variance is None:
            object.__setattr__(self, "pca_k", DEFAULT_PCA_K)

    def selection(self) -> Selection:
        """The mode preset combined with the explicit selection flags (flags win)."""
        classes = self.classes or (APPLE_CLASSES if self.mode == "apples" else ())
        limit = self.limit if self.limit is not None else (MINI_IMAGES if self.mode == "mini" else None)
        return Selection(split=self.split, classes=tuple(classes), per_class=self.per_class, limit=limit)

    def merges_csv(self, images: int) -> bool:
        """Whether a run of `images` listed images writes one CSV file per table, not a folder of parts."""
        return self.csv_merged or images <= CSV_SINGLE_FILE_MAX_IMAGES

    def validate(self) -> RunConfig:
        """Raise FruitpipeError with one clear sentence for the first invalid value; return self."""
        if not self.source:
            raise FruitpipeError("no source given: pass the folder or URI that holds Training/<class>/*.jpg")
        if not self.output:
            raise FruitpipeError("no output given: pass the folder or URI to write the run to")
        if self.mode not in MODES:
            raise FruitpipeError(f"unknown mode {_shown(self.mode)}: choose one of {', '.join(MODES)}")
        if self.split not in SPLITS:
            raise FruitpipeError(f"unknown split {_shown(self.split)}: choose one of {', '.join(SPLITS)}")
        for name in ("per_class", "limit", "image_size", "batch_size", "shard_size", "threads_per_task",
                     "read_attempts"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise FruitpipeError(f"{_flag(name)} must be a positive integer, got {_shown(value)}")
        if self.precision not in PRECISIONS:
            raise FruitpipeError(f"unknown precision {_shown(self.precision)}: choose one of {', '.join(PRECISIONS)}")
        if self.runtime not in RUNTIMES:
            raise FruitpipeError(f"unknown runtime {_shown(self.runtime)}: choose one of {', '.join(RUNTIMES)}")
        if self.model_file is not None and not self.model_file.strip():
            raise FruitpipeError("--model-file must not be empty: pass the folder `fruitpipe export-model` wrote")
        if self.image_size is not None and self.image_size < 32:
            raise FruitpipeError(f"--image-size must be at least 32 pixels, got {self.image_size}")
        if self.pca_variance is not None:
            if self.pca_k is not None:
                raise FruitpipeError(f"--pca-k {_shown(self.pca_k)} and --pca-variance {_shown(self.pca_variance)} "
                                     "both given: keep k components or the fewest reaching the variance, not both")
            if not _is_number(self.pca_variance) or not 0 < self.pca_variance <= 1:
                raise FruitpipeError(f"--pca-variance must be in (0, 1], got {_shown(self.pca_variance)}")
        elif not isinstance(self.pca_k, int) or isinstance(self.pca_k, bool) or self.pca_k < 1:
            raise FruitpipeError(f"--pca-k must be a positive integer, got {_shown(self.pca_k)}")
        if not _is_number(self.read_timeout_s) or self.read_timeout_s <= 0:
            raise FruitpipeError("--read-timeout must be a positive number of seconds, "
                                 f"got {_shown(self.read_timeout_s)}")
        if self.master is not None and not self.master.strip():
            raise FruitpipeError("--master must not be empty (default: local[*])")
        if self.master is not None and not _MASTER_PATTERN.match(self.master.strip()):
            raise FruitpipeError(f"unknown Spark master {_shown(self.master)}: use local[N], spark://host:port, yarn "
                                 "or k8s://https://host:port")
        if self.engine not in ENGINES:
            raise FruitpipeError(f"unknown engine {_shown(self.engine)}: choose one of {', '.join(ENGINES)}")
        _check_spark_conf(self.spark_conf)
        return self

    def fingerprint(self, weights_sha256: str, input_size: int, onnx_sha256: str, runtime: str,
                    resize_method: str) -> str:
        """What the stored features depend on: a different value means an existing OUT cannot be resumed.

        The ONNX bytes count, not where they came from: a run from an artifact and a run exporting the same
        bytes resume each other. So do the runtime that computes them (resolved, never "auto"), the precision and
        the host-side resize (images.RESIZE_METHOD): a run's features never mix runtimes, precisions or resizes.
        """
        selection = dataclasses.asdict(self.selection())
        identity = {"source": self.source.rstrip("/"), "selection": selection, "model": self.model,
                    "weights_sha256": weights_sha256, "input_size": input_size, "shard_size": self.shard_size,
                    "precision": self.precision, "onnx_sha256": onnx_sha256, "runtime": runtime,
                    "resize": resize_method}
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


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: object) -> str:
    """A value's type in words, for messages that must not show the value."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple, set)):
        return "a list"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value),
                                                                                         type(value).__name__)


def _shown(value: object) -> str:
    """A value as an error message may show it: numbers and short plain strings as they are; a mapping, a list or a
    string shaped like a key or token only by its type, so no configuration secret is ever echoed."""
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, str) and len(value) <= 200 and not _SECRET_VALUE_PATTERN.match(value.strip()):
        return repr(value)
    return f"{_kind(value)} (not shown)"


def _check_spark_conf(settings: Mapping[str, Any]) -> None:
    """Spark settings must be scalars, and JVM sizes well formed (a bad size stops the JVM with Java's own lines)."""
    if not isinstance(settings, Mapping):
        raise FruitpipeError("spark_conf must be a mapping of Spark setting: value")
    for key, value in dict(settings).items():
        if isinstance(value, (Mapping, list, tuple, set)) or value is None:
            raise FruitpipeError(f"Spark setting {key} must be a single value, got {_kind(value)}")
        if _MEMORY_SETTING.match(str(key)) and not _MEMORY_SIZE.match(str(value).strip()):
            raise FruitpipeError(f"Spark setting {key} must be a size such as 4g or 512m, got {_shown(str(value))}")


def _without_none(hint: Any) -> Any:
    """`X | None` as X: None always means "not given", so only X is ever checked."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_strings(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))


# What a value of each field type must be, and that type in words (messages name types, never values). A mapping
# is checked by the validate() rule that owns its field, which can say what its keys are (_check_spark_conf).
_TYPE_CHECKS: dict[Any, tuple[Callable[[object], bool], str]] = {
    int: (_is_int, "an integer"),
    float: (_is_number, "a number"),
    bool: (lambda value: isinstance(value, bool), "true or false"),
    str: (lambda value: isinstance(value, str), "a string"),
    tuple[str, ...]: (_is_strings, "a string or a list of strings"),
}
_CHECKED_IN_VALIDATE = frozenset({Mapping[str, str]})


def field_types(schema: type, checked_elsewhere: frozenset[Any] = frozenset()) -> dict[str, Any]:
    """Each field's type without None, read from a config dataclass itself (RunConfig, the EMR section): its loader,
    keyword API and CLI check and name values from this, so a new field needs no other edit, and a field of a type
    no check knows fails here, at import, instead of going unchecked. `checked_elsewhere` are types a rule of the
    schema's own checks (a mapping, whose keys only that rule can describe)."""
    hints = typing.get_type_hints(schema)
    kinds = {f.name: _without_none(hints[f.name]) for f in dataclasses.fields(schema)}
    unknown = {name: kind for name, kind in kinds.items() if kind not in _TYPE_CHECKS and kind not in
               checked_elsewhere}
    if unknown:
        raise TypeError(f"{schema.__name__} fields of a type fruitpipe.config cannot check: {unknown}")
    return kinds


def check_field_types(values: Mapping[str, Any], types: Mapping[str, Any], prefix: str = "option ") -> None:
    """Refuse a value of the wrong type by naming the types only: the value may be a mapping holding secrets."""
    for key, kind in types.items():
        value, check = values.get(key), _TYPE_CHECKS.get(kind)
        if value is not None and check is not None and not check[0](value):
            raise FruitpipeError(f"{prefix}{key} has the wrong type: must be {check[1]}, got {_kind(value)}")


FIELD_TYPES = field_types(RunConfig, _CHECKED_IN_VALIDATE)


def load_yaml(path: str | None) -> dict[str, Any]:
    """The YAML config file as a mapping (empty when no file is given)."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise FruitpipeError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise FruitpipeError(f"config file {path} is a folder; give a YAML file") from None
    except OSError as exc:
        raise FruitpipeError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise FruitpipeError(f"config file {path} is not text (UTF-8 YAML expected)") from None
    except yaml.YAMLError as exc:
        raise FruitpipeError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FruitpipeError(f"config file {path} must hold a mapping of option: value")
    return data


def resolve_config(file: str | None, overrides: Mapping[str, Any], *,
                   defaults: Mapping[str, Any] | None = None) -> RunConfig:
    """The one way the CLI, the Python API and `emr upload` make a RunConfig: the YAML file as defaults, non-None
    overrides (flags, keywords) on top, validated. `defaults` fill what the file leaves unset or empty."""
    file_values = load_yaml(file)
    filled = {key: value for key, value in (defaults or {}).items() if not file_values.get(key)}
    return build_config({**file_values, **filled}, overrides)


def build_config(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> RunConfig:
    """File values as defaults, non-None overrides on top (a mapping override adds to the file's mapping);
    unknown keys and wrong types are clear errors."""
    merged: dict[str, Any] = {}
    for key, value in file_values.items():
        if key == "emr":
            continue
        normalised = key.replace("-", "_")
        if normalised not in FIELD_TYPES:
            raise FruitpipeError(f"unknown option {key!r} in config file; known: {', '.join(sorted(FIELD_TYPES))}")
        merged[normalised] = value
    for key, value in overrides.items():
        if value is not None:
            below = merged.get(key)
            merged[key] = {**below, **value} if isinstance(below, Mapping) and isinstance(value, Mapping) else value
    check_field_types(merged, FIELD_TYPES)
    for key in ("source", "output"):
        merged[key] = absolute_if_local(merged.get(key) or "")
    for key, value in merged.items():
        if FIELD_TYPES[key] == tuple[str, ...]:
            merged[key] = (value,) if isinstance(value, str) else tuple(value or ())
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


def parse_spark_conf(pairs: list[str] | None) -> dict[str, str]:
    """`--spark-conf key=value` flags as a mapping."""
    result: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FruitpipeError(f"--spark-conf expects key=value, got {_shown(pair)}")
        result[key.strip()] = value.strip()
    return result
