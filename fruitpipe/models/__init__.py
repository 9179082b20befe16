"""Model registry: each architecture module registers its spec and builder with `@register_model`.

Importing this package needs neither torch nor onnx, so a ModelSpec or ExportedModel can be unpickled on an
executor. Looking up or building a model imports the architecture modules, which need torch (driver only).
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
from fruitpipe.images import Preprocessing

if TYPE_CHECKING:
    import torch

# Five stride-2 stages bring a 32-pixel input down to a single position; smaller inputs are not meaningful.
MIN_INPUT_SIZE = 32
RANDOM_WEIGHTS = "random"
RANDOM_SEED = 0

_ARCHITECTURE_MODULES = ("fruitpipe.models.efficientnet_lite", "fruitpipe.models.mobilenet_v2")


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


Builder = Callable[[int], "torch.nn.Module"]


@dataclass(frozen=True)
class RegisteredModel:
    """A spec, a builder of its untrained network for a given input size, and its bundled weights if any."""

    spec: ModelSpec
    build: Builder
    packaged_weights: Callable[[], str] | None


_REGISTRY: dict[str, RegisteredModel] = {}


def register_model(spec: ModelSpec, packaged_weights: Callable[[], str] | None = None) -> Callable[[Builder], Builder]:
    """Decorator for an architecture's builder `(input_size) -> nn.Module` returning (features, logits)."""

    def decorate(build: Builder) -> Builder:
        if spec.name in _REGISTRY:
            raise ValueError(f"model {spec.name!r} registered twice")
        _REGISTRY[spec.name] = RegisteredModel(spec, build, packaged_weights)
        return build

    return decorate


@functools.cache
def _registry() -> dict[str, RegisteredModel]:
    for module in _ARCHITECTURE_MODULES:
        importlib.import_module(module)
    return _REGISTRY


def registered(name: str) -> RegisteredModel:
    """The registry entry for `name`; an unknown name is a user error that lists the known ones."""
    entry = _registry().get(name)
    if entry is None:
        raise FruitpipeError(f"unknown model {name!r}; known models: {', '.join(available_models())}")
    return entry


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model."""
    return registered(name).spec


def available_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_registry())


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
