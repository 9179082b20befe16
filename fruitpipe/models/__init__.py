"""Model builders: each architecture module registers a builder for a spec name with `@register_model`.

Specs are data in fruitpipe.models.specs (no torch). Importing this package needs neither torch nor onnx, so
a ModelSpec can be unpickled on an executor; building or exporting a model imports the architecture modules,
which need torch (the driver extra).
"""

from __future__ import annotations

import functools
import importlib
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from fruitpipe.errors import FruitpipeError
from fruitpipe.extras import needs_extras
from fruitpipe.models.specs import MIN_INPUT_SIZE, ModelSpec, available_models, get_spec

if TYPE_CHECKING:
    import torch

RANDOM_WEIGHTS = "random"
RANDOM_SEED = 0

_ARCHITECTURE_MODULES = ("fruitpipe.models.efficientnet_lite", "fruitpipe.models.mobilenet_v2")


Builder = Callable[[int], "torch.nn.Module"]


@dataclass(frozen=True)
class RegisteredModel:
    """A spec and a builder of its untrained network for a given input size."""

    spec: ModelSpec
    build: Builder


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator for the builder `(input_size) -> nn.Module` returning (features, logits) of the spec `name`."""

    def decorate(build: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = RegisteredModel(get_spec(name), build)
        return build

    return decorate


@functools.cache
def _registry() -> dict[str, RegisteredModel]:
    for module in _ARCHITECTURE_MODULES:
        importlib.import_module(module)
    return _REGISTRY


def registered(name: str) -> RegisteredModel:
    """The registry entry for `name` (imports the architectures: torch); an unknown name lists the known ones."""
    get_spec(name)
    with needs_extras(f"exporting {name}"):
        return _registry()[name]


def build_model(spec: ModelSpec, weights_path: str | None, input_size: int | None = None) -> torch.nn.Module:
    """The network in eval mode with the given state dict loaded strictly; forward(x) -> (features, logits).

    weights_path None or "random" gives a seeded random initialisation, identical on every call. TF-style
    padding depends on the input size, so build for the size the network will see.
    """
    import torch

    size = spec.preprocessing(input_size).size
    entry = registered(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = entry.build(size)
    if weights_path not in (None, RANDOM_WEIGHTS):
        _load_strict(model, weights_path, spec.name)
    return model.eval()


def _load_strict(model: torch.nn.Module, weights_path: str, model_name: str) -> None:
    """Load a state dict file, explaining a mismatch in one line instead of torch's multi-line key dump."""
    import torch

    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise FruitpipeError(f"{weights_path} is not a PyTorch state dict file: {reason}") from None
    if not isinstance(state, dict):
        raise FruitpipeError(f"{weights_path} holds a {type(state).__name__}, not a {model_name} state dict")
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key} {tuple(getattr(state[key], 'shape', ()))} != {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and tuple(getattr(state[key], "shape", ())) != tuple(value.shape)
    ]
    problems = [
        f"{len(items)} {what} (first: {items[0]})"
        for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped))
        if items
    ]
    if problems:
        raise FruitpipeError(f"{weights_path} does not fit {model_name}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


@functools.cache
def _class_names() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f"imagenet_classes.txt has {len(names)} names, expected 1000")
    return names


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in logit order."""
    return list(_class_names())


# Imported last: these modules import ModelSpec and the registry from this package.
from fruitpipe.models.export import ExportedModel, export_onnx  # noqa: E402
from fruitpipe.models.predict import predict_topk  # noqa: E402
from fruitpipe.models.weights import resolve_weights  # noqa: E402

__all__ = [
    "MIN_INPUT_SIZE",
    "RANDOM_WEIGHTS",
    "ExportedModel",
    "ModelSpec",
    "RegisteredModel",
    "available_models",
    "build_model",
    "export_onnx",
    "get_spec",
    "imagenet_classes",
    "predict_topk",
    "register_model",
    "registered",
    "resolve_weights",
]
