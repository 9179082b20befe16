"""torch -> ONNX export, cached by model, weights hash and input size, so executors only need ONNX Runtime.

The graph takes uint8 RGB pixels at the model's size and normalises them itself (Transpose, Cast, Mul, Add: the
same float32 arithmetic as images.normalise): executors skip the float tensor and its four times larger batches.
The resize stays on the executor (images.py: OpenCV's exact bilinear when enlarging, a sixth of PIL's CPU): an
ONNX Resize in the graph cost more inference time than the host resize it saved, and rounds differently from
either host resize, which this network turns into feature differences far above 1e-3
(bench/graph_bench.py --preprocessing measures them).
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fruitpipe.extras import needs_extras
from fruitpipe.images import Preprocessing
from fruitpipe.models import ModelSpec, build_model
from fruitpipe.models.specs import ONNX_FEATURES, ONNX_LOGITS, ONNX_PIXELS
from fruitpipe.models.weights import resolve_weights, sha256_file

if TYPE_CHECKING:
    import torch

OUTPUT_NAMES = (ONNX_FEATURES, ONNX_LOGITS)
OPSET = 17
# Part of the cached file's name: bump it when the exported graph changes, so no cache serves an older graph.
# 2: explicit zero fill in TF padding (ONNX Runtime folds the Pads into the convolutions).
# 3: uint8 NHWC pixels in, normalised inside the graph.
GRAPH_VERSION = 3


@dataclass(frozen=True)
class ExportedModel:
    """An ONNX file and what it was built from; weights_sha256 is "random" for seeded random weights."""

    path: str
    model: str
    weights_sha256: str
    input_size: int
    onnx_sha256: str


def export_onnx(spec: ModelSpec, weights: str | None, cache_dir: str, input_size: int | None = None) -> ExportedModel:
    """The model as ONNX (input "pixels" [N,S,S,3] uint8; outputs "features", "logits"), exported once per cache.

    weights is as for resolve_weights. The file is checked by onnx.checker before it is cached.
    """
    size = spec.preprocessing(input_size).size
    weights_path, weights_sha256 = resolve_weights(spec, weights, cache_dir)
    target = Path(cache_dir) / "onnx" / f"{spec.name}-{weights_sha256[:12]}-{size}-g{GRAPH_VERSION}.onnx"
    if not target.is_file():
        _export(spec, weights_path, size, target)
    return ExportedModel(str(target), spec.name, weights_sha256, size, sha256_file(target))


def _export(spec: ModelSpec, weights_path: str, size: int, target: Path) -> None:
    """Export to a temporary file and rename it, so a concurrent or interrupted export never leaves a partial file."""
    with needs_extras(f"exporting {spec.name}"):
        import onnx
        import torch

    model = _normalising(build_model(spec, weights_path, size), spec.preprocessing(size))
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", DeprecationWarning)
            # TF padding's Pad amounts (a Slice with steps=-1) are left for the runtime to fold when it loads.
            warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
            torch.onnx.export(
                model,
                (torch.zeros(1, size, size, 3, dtype=torch.uint8),),
                temp,
                dynamo=False,
                input_names=[ONNX_PIXELS],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in (ONNX_PIXELS, *OUTPUT_NAMES)},
                opset_version=OPSET,
            )
        onnx.checker.check_model(temp, full_check=True)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _normalising(network: torch.nn.Module, prep: Preprocessing) -> torch.nn.Module:
    """`network` behind a uint8 NHWC input: transposed while still bytes, then (p * scale + shift) in float32."""
    import torch

    class NormalisingInput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network
            scale, shift = prep.scale_and_shift()
            self.register_buffer("scale", torch.from_numpy(scale))
            self.register_buffer("shift", torch.from_numpy(shift))

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.network(pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift)

    return NormalisingInput().eval()
