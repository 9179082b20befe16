"""A model artifact: the ONNX feature extractor plus a small JSON saying what it is. The unit a run consumes.

Exporting one needs torch (the driver extra, on the user's machine); loading one needs only the base
dependencies, so `run --model-file`, `transform`, `evaluate`, executors and EMR nodes never import torch.
A run folder's `model/` holds the artifact its features were computed with.

Layout of an artifact folder (local or any fsspec URI):
    feature_extractor.onnx   input "pixels" [N,S,S,3] uint8 (older artifacts: "images" [N,3,S,S] float32,
                             normalised); outputs "features", "logits"
    model.json               spec fields, input size, precision, weights and ONNX sha256, fruitpipe version
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fruitpipe.config import DEFAULT_CACHE_DIR, MODEL_PRECISIONS, Selection
from fruitpipe.errors import FruitpipeError
from fruitpipe.images import Preprocessing
from fruitpipe.models.specs import ModelSpec, get_spec
from fruitpipe.storage import locate, read_bytes, write_bytes
from fruitpipe.version import __version__

ARTIFACT_ONNX = "feature_extractor.onnx"
ARTIFACT_JSON = "model.json"
ARTIFACT_FORMAT = 1


@dataclass(frozen=True)
class ModelArtifact:
    """What an ONNX feature extractor computes: its spec, input size, precision and the hashes that identify it."""

    spec: ModelSpec
    input_size: int
    precision: str
    weights_sha256: str
    onnx_sha256: str
    # The weights as the user named them (a path, a URI, "random") or the spec's source.
    weights: str
    # int8 only: what the activation ranges were calibrated on.
    calibration: str | None = None
    fruitpipe_version: str = __version__

    @property
    def name(self) -> str:
        return self.spec.name

    def preprocessing(self) -> Preprocessing:
        """The preprocessing every image gets before this extractor sees it."""
        return self.spec.preprocessing(self.input_size)

    def to_json(self) -> dict[str, Any]:
        return {"format": ARTIFACT_FORMAT, "model": self.spec.name, "spec": dataclasses.asdict(self.spec),
                "input_size": self.input_size, "precision": self.precision, "weights": self.weights,
                "weights_sha256": self.weights_sha256, "onnx_file": ARTIFACT_ONNX, "onnx_sha256": self.onnx_sha256,
                "calibration": self.calibration, "fruitpipe": self.fruitpipe_version}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelArtifact:
        """The artifact a model.json describes; KeyError/TypeError/ValueError when it is not one."""
        spec_fields = dict(data["spec"])
        spec_fields["mean"], spec_fields["std"] = tuple(spec_fields["mean"]), tuple(spec_fields["std"])
        precision = str(data["precision"])
        if precision not in MODEL_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        return cls(spec=ModelSpec(**spec_fields), input_size=int(data["input_size"]), precision=precision,
                   weights_sha256=str(data["weights_sha256"]), onnx_sha256=str(data["onnx_sha256"]),
                   weights=str(data["weights"]), calibration=data.get("calibration"),
                   fruitpipe_version=str(data.get("fruitpipe", "")))


def build_artifact(model: str, weights: str | None, *, image_size: int | None = None, precision: str = "fp32",
                   calibration_images: Callable[[], list[bytes]] | None = None, calibration: str | None = None,
                   cache_dir: str = DEFAULT_CACHE_DIR) -> tuple[ModelArtifact, bytes]:
    """Export `model` to ONNX (cached) and, for int8, quantize it on `calibration_images()`: needs the driver extra.

    calibration_images is called only for int8, after the export, so a missing torch is reported before any
    images are listed; `calibration` says in words what they are.
    """
    from fruitpipe.models import export_onnx
    from fruitpipe.quantize import quantize_int8

    spec = get_spec(model)
    if precision not in MODEL_PRECISIONS:
        raise FruitpipeError(f"unknown model precision {precision!r}: choose one of {', '.join(MODEL_PRECISIONS)}")
    exported = export_onnx(spec, weights, cache_dir, image_size)
    path, onnx_sha256 = exported.path, exported.onnx_sha256
    if precision == "int8":
        if calibration_images is None:
            raise FruitpipeError("an int8 model needs images to calibrate on: pass --calibration SRC")
        preprocessing = spec.preprocessing(exported.input_size)
        path, onnx_sha256 = quantize_int8(path, onnx_sha256, preprocessing, calibration_images(), cache_dir)
    else:
        calibration = None
    with open(path, "rb") as handle:
        onnx = handle.read()
    artifact = ModelArtifact(spec=spec, input_size=exported.input_size, precision=precision,
                             weights_sha256=exported.weights_sha256, onnx_sha256=onnx_sha256,
                             weights=weights or spec.weights_source, calibration=calibration)
    return artifact, onnx


def export_artifact(model: str, weights: str | None, destination: str, *, image_size: int | None = None,
                    precision: str = "fp32", calibration_source: str | None = None,
                    cache_dir: str = DEFAULT_CACHE_DIR) -> ModelArtifact:
    """Export `model` as an artifact folder at `destination` (local or fsspec URI). Needs torch (driver extra).

    int8 is calibrated here, on images spread over calibration_source (a folder laid out like a run's SRC,
    its Training split), so a node running the artifact needs neither torch nor onnx.
    """
    from fruitpipe.quantize import calibration_images

    images = None if calibration_source is None else (lambda: calibration_images(calibration_source, Selection()))
    artifact, onnx = build_artifact(model, weights, image_size=image_size, precision=precision,
                                    calibration_images=images, calibration=calibration_source, cache_dir=cache_dir)
    write_artifact(destination, artifact, onnx)
    return artifact


def write_artifact(destination: str, artifact: ModelArtifact, onnx: bytes) -> None:
    """Write the ONNX file, then model.json last: a folder with a model.json holds a complete artifact."""
    location = locate(destination)
    try:
        write_bytes(location, location.join(ARTIFACT_ONNX), onnx)
        write_bytes(location, location.join(ARTIFACT_JSON), json.dumps(artifact.to_json(), indent=2).encode())
    except OSError as exc:
        raise FruitpipeError(f"cannot write the model artifact to {destination}: {exc.strerror or exc}") from None


def load_artifact(uri: str) -> tuple[ModelArtifact, bytes]:
    """The artifact in folder `uri` (local or s3://) and its ONNX bytes, checked against the recorded sha256.

    `uri` may also name the folder's model.json or ONNX file. No torch, no onnx.
    """
    folder = uri.rstrip("/")
    for name in (ARTIFACT_JSON, ARTIFACT_ONNX):
        if folder.endswith("/" + name):
            folder = folder[: -len(name) - 1]
    location = locate(folder)
    how = "make one with `fruitpipe export-model`"
    try:
        document = json.loads(read_bytes(location, location.join(ARTIFACT_JSON)))
        artifact = ModelArtifact.from_json(document)
    except FileNotFoundError:
        raise FruitpipeError(f"{uri} is not a model artifact (no {ARTIFACT_JSON}); {how}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise FruitpipeError(f"{folder}/{ARTIFACT_JSON} is not a valid model artifact description ({exc}); "
                             f"{how}") from None
    try:
        onnx = read_bytes(location, location.join(ARTIFACT_ONNX))
    except FileNotFoundError:
        raise FruitpipeError(f"model artifact {uri} has no {ARTIFACT_ONNX}; {how}") from None
    actual = hashlib.sha256(onnx).hexdigest()
    if actual != artifact.onnx_sha256:
        raise FruitpipeError(f"{folder}/{ARTIFACT_ONNX} is corrupt or was replaced: its sha256 {actual[:12]}... "
                             f"differs from {artifact.onnx_sha256[:12]}... in {ARTIFACT_JSON}; export it again")
    return artifact, onnx
