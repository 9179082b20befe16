"""int8 feature extractors: ONNX Runtime static quantization, calibrated on a fixed sample of images.

The sample is the run's own selection (`run --precision int8`, on a driver with the driver extra: the quantizer
imports onnx) or, for an int8 model artifact, the `--calibration SRC` of `export-model`, so nodes without onnx
run int8 from the artifact.

QDQ format, int8 per-channel weights and uint8 activations (the combination ONNX Runtime's x86 int8 kernels run
fastest; int8 activations measured no faster than fp32). Activation ranges come from min/max over
CALIBRATION_IMAGES images spread evenly over that selection. The result is cached next to the fp32 export,
named by a hash of the fp32 model, the preprocessing, the calibration images and these settings, so a run and
its resume use the same file and an int8 model never shares a model key with its fp32 source.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fruitpipe.errors import FruitpipeError
from fruitpipe.extras import needs_extras
from fruitpipe.images import ImageDecodeError, Preprocessing, model_pixels
from fruitpipe.models.specs import ONNX_PIXELS

CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 8
SETTINGS_VERSION = "qdq-u8s8-per-channel-minmax-v1"

if TYPE_CHECKING:
    from fruitpipe.config import RunConfig, Selection
    from fruitpipe.models.export import ExportedModel


def quantize_for_run(exported: ExportedModel, preprocessing: Preprocessing, config: RunConfig) -> tuple[str, str]:
    """(path, sha256) of the int8 model for a run, calibrated on its own selection (listed here: the model is
    exported before the run lists its images)."""
    images = calibration_images(config.source, config.selection())
    return quantize_int8(exported.path, exported.onnx_sha256, preprocessing, images, config.cache_dir)


def calibration_images(source: str, selection: Selection) -> list[bytes]:
    """The calibration sample of the images `selection` takes from `source`."""
    from fruitpipe.dataset import list_split, select

    images = select(list_split(source, selection.split).images, selection)
    return calibration_sample(source, [record.path for record in images])


def calibration_sample(source: str, paths: list[str], count: int = CALIBRATION_IMAGES) -> list[bytes]:
    """The bytes of up to `count` images spread evenly over `paths` (relative to `source`), in path order."""
    from fruitpipe.storage import locate, read_bytes

    if not paths:
        return []
    ordered = sorted(paths)
    picks = sorted({int(i) for i in np.linspace(0, len(ordered) - 1, num=min(count, len(ordered)))})
    location = locate(source)
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda i: read_bytes(location, location.join(ordered[i])), picks))


def _calibration_tensors(images: list[bytes], preprocessing: Preprocessing) -> list[np.ndarray]:
    """The images as the exported graph takes them (uint8 pixels: it normalises them itself)."""
    tensors = []
    for data in images:
        try:
            tensors.append(model_pixels(data, preprocessing)[0])
        except ImageDecodeError:
            continue
    return tensors


def _cache_key(fp32_sha256: str, preprocessing: Preprocessing, images: list[bytes]) -> str:
    digest = hashlib.sha256(f"{SETTINGS_VERSION}|{fp32_sha256}|{preprocessing!r}".encode())
    for data in images:
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()


def quantize_int8(fp32_path: str, fp32_sha256: str, preprocessing: Preprocessing, images: list[bytes],
                  cache_dir: str) -> tuple[str, str]:
    """(path, sha256) of the int8 version of an fp32 ONNX feature extractor, calibrated on `images`; built once.

    Undecodable calibration images are skipped; none decodable is a FruitpipeError.
    """
    from fruitpipe.models.weights import sha256_file

    key = _cache_key(fp32_sha256, preprocessing, images)
    target = Path(cache_dir) / "onnx" / f"{Path(fp32_path).stem}-int8-{key[:12]}.onnx"
    if not target.is_file():
        tensors = _calibration_tensors(images, preprocessing)
        if not tensors:
            raise FruitpipeError("--precision int8 needs decodable images to calibrate on; none of the "
                                 f"{len(images)} sampled images could be decoded")
        _quantize(fp32_path, tensors, target)
    return str(target), sha256_file(target)


def _quantize(fp32_path: str, tensors: list[np.ndarray], target: Path) -> None:
    """Shape-infer and optimise the fp32 graph, quantize it, then rename into the cache (never a partial file)."""
    # onnxruntime.quantization imports onnx (driver extra): an int8 artifact is made where the export is.
    with needs_extras("calibrating an int8 model"):
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quant_pre_process, quantize_static)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            starts = range(0, len(tensors), CALIBRATION_BATCH)
            self._batches = (np.stack(tensors[i:i + CALIBRATION_BATCH]) for i in starts)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {ONNX_PIXELS: batch}

    target.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger()
    level = quiet.level
    with tempfile.TemporaryDirectory(prefix="fruitpipe-int8-") as work:
        prepared = os.path.join(work, "prepared.onnx")
        quantized = os.path.join(work, "quantized.onnx")
        quiet.setLevel(logging.ERROR)
        try:
            quant_pre_process(fp32_path, prepared)
            quantize_static(prepared, quantized, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=_input_normalisation(prepared))
        finally:
            quiet.setLevel(level)
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
        shutil.copyfile(quantized, temporary)
        os.replace(temporary, target)


def _input_normalisation(path: str) -> list[str]:
    """The nodes between the graph's pixels input and its first convolution (Transpose, Cast, Mul, Add): left in
    float, so the normalised image is quantized once, at the convolution's input, as before the graph took pixels
    (quantized, each of them would add a quantize-dequantize pass over the whole image)."""
    import onnx

    graph = onnx.load(path).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names, value = [], graph.input[0].name
    while len(following := consumers.get(value, [])) == 1 and following[0].op_type != "Conv":
        names.append(following[0].name)
        value = following[0].output[0]
    return names
