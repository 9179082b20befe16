"""Feature extraction inside a worker process: one loaded runtime per model and setting, built there from the
model's bytes and reused by every shard task the process runs.

Runtimes are cached by the model's key (its sha256) and never pickled; Spark ships only the ONNX bytes (a
broadcast). What a runtime is and how auto chooses one lives in fruitpipe.runtimes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fruitpipe import runtimes
from fruitpipe.runtimes import ALLOW_SPINNING, OnnxRuntimeCPU, Runtime

__all__ = ["create_session", "extract_features", "runtime_for", "session_for"]

_RUNTIMES: dict[tuple, Runtime] = {}


def runtime_for(model_key: str, load_model_bytes: Callable[[], bytes], threads: int, precision: str = "fp32",
                runtime: str = runtimes.ONNXRUNTIME, tasks_per_node: int | None = None,
                cache_dir: str | None = None, batch_size: int = runtimes.PROBE_BATCH) -> Runtime:
    """The process's runtime for this model and setting, loaded on first use (see runtimes.load)."""
    key = (model_key, threads, precision, runtime, tasks_per_node, batch_size)
    loaded = _RUNTIMES.get(key)
    if loaded is None:
        loaded = runtimes.load(load_model_bytes(), threads, precision, runtime, tasks_per_node=tasks_per_node,
                               cache_dir=cache_dir, batch_size=batch_size)
        _RUNTIMES[key] = loaded
    return loaded


def session_for(model_key: str, load_model_bytes: Callable[[], bytes], threads: int) -> Runtime:
    """The process's ONNX Runtime fp32/int8 runtime for this model (the pipeline's setting before --runtime)."""
    return runtime_for(model_key, load_model_bytes, threads)


def create_session(model_bytes: bytes, threads: int, allow_spinning: bool = ALLOW_SPINNING) -> Runtime:
    """An uncached ONNX Runtime runtime with the pipeline's options (benchmarks vary allow_spinning)."""
    return OnnxRuntimeCPU(model_bytes, threads, allow_spinning=allow_spinning)


def extract_features(runtime: Runtime, batch: np.ndarray) -> np.ndarray:
    """A batch of what the runtime's graph takes ([N, S, S, 3] uint8 pixels or [N, 3, S, S] float32, its
    input_name says) -> [N, D] float32 pooled features."""
    return runtime.run(batch)
