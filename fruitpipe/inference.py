"""ONNX Runtime feature extraction: one session per worker process, built there from the model's bytes.

Sessions are cached by the model's sha256 and never pickled; Spark ships only the ONNX bytes (a broadcast).
The same options serve fp32 and int8 (QDQ) models: ONNX Runtime fuses QDQ pairs into int8 kernels on load.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

INPUT_NAME = "images"
FEATURES_OUTPUT = "features"
LOGITS_OUTPUT = "logits"

# Idle intra-op threads busy-wait by default; inside a Spark task they would take CPU from the decode threads
# of the same shard and from the other tasks (measured in BENCHMARKS.md), so they sleep instead.
ALLOW_SPINNING = False

_SESSIONS: dict[tuple[str, int], ort.InferenceSession] = {}


def session_options(threads: int, allow_spinning: bool = ALLOW_SPINNING) -> ort.SessionOptions:
    """Options for one task's session: `threads` intra-op threads, sequential, fully optimised graph."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


def create_session(model_bytes: bytes, threads: int, allow_spinning: bool = ALLOW_SPINNING) -> ort.InferenceSession:
    """A CPU session for an ONNX model (fp32 or int8) with the pipeline's options."""
    return ort.InferenceSession(model_bytes, sess_options=session_options(threads, allow_spinning),
                                providers=["CPUExecutionProvider"])


def session_for(model_key: str, load_model_bytes: Callable[[], bytes], threads: int) -> ort.InferenceSession:
    """The process's session for this model, created on first use with `threads` intra-op threads."""
    key = (model_key, threads)
    session = _SESSIONS.get(key)
    if session is None:
        session = create_session(load_model_bytes(), threads)
        _SESSIONS[key] = session
    return session


def extract_features(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """[N, 3, S, S] float32 -> [N, D] float32 pooled features."""
    (features,) = session.run([FEATURES_OUTPUT], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
    return np.asarray(features, dtype=np.float32)
