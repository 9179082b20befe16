"""ImageNet top-k predictions, run on the exported ONNX model: a check that the weights and preprocessing fit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from fruitpipe.errors import FruitpipeError
from fruitpipe.images import ImageDecodeError, model_pixels
from fruitpipe.models import ModelSpec, imagenet_classes
from fruitpipe.models.export import export_onnx
from fruitpipe.models.specs import ONNX_LOGITS, ONNX_PIXELS


def predict_topk(images: list[bytes], spec: ModelSpec, weights: str | None, cache_dir: str,
                 top: int = 5) -> list[list[tuple[int, str, float]]]:
    """Per image, the `top` (class index, class name, softmax probability), most probable first."""
    if top < 1:
        raise FruitpipeError(f"top must be at least 1, got {top}")
    exported = export_onnx(spec, weights, cache_dir)
    prep = spec.preprocessing(exported.input_size)
    tensors = []
    for index, data in enumerate(images):
        try:
            tensors.append(model_pixels(data, prep)[0])
        except ImageDecodeError as exc:
            raise FruitpipeError(f"image {index}: {exc}") from None
    if not tensors:
        return []
    session = ort.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
    (logits,) = session.run([ONNX_LOGITS], {ONNX_PIXELS: np.stack(tensors)})
    shifted = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    names = imagenet_classes()
    ranked = np.argsort(-probabilities, axis=1, kind="stable")[:, :top]
    return [
        [(int(label), names[label], float(row[label])) for label in labels]
        for row, labels in zip(probabilities, ranked)
    ]
