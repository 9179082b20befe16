"""ONNX Runtime feature extraction: one session per worker process, built there from the model's bytes.

Sessions are cached by the model's sha256 and never pickled; Spark ships only the ONNX bytes (a broadcast).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnxruntime as ort

INPUT_NAME = "images"
FEATURES_OUTPUT = "features"
LOGITS_OUTPUT = "logits"

_SESSIONS: dict[tuple[str, int], ort.InferenceSession] = {}


def session_for(model_key: str, load_model_bytes: Callable[[], bytes], threads: int) -> ort.InferenceSession:
    """The process's session for this model, created on first use with `threads` intra-op threads."""
    key = (model_key, threads)
    session = _SESSIONS.get(key)
    if session is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(load_model_bytes(), sess_options=options, providers=["CPUExecutionProvider"])
        _SESSIONS[key] = session
    return session


def extract_features(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    """[N, 3, S, S] float32 -> [N, D] float32 pooled features."""
    (features,) = session.run([FEATURES_OUTPUT], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
    return np.asarray(features, dtype=np.float32)
