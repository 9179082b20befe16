"""Runs on each runtime and precision: what is recorded, what resumes, and features equal within the precision's
tolerance to the default run (ONNX Runtime fp32 on this machine)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fruitpipe import runtimes
from fruitpipe.config import build_config
from fruitpipe.errors import FruitpipeError
from fruitpipe.pipeline import run

pytestmark = pytest.mark.spark


def _config(demo_root, output: Path, cache_dir: str, **options):
    return build_config({}, {"source": str(demo_root), "output": str(output), "pca_k": 10, "shard_size": 20,
                             "cache_dir": cache_dir, "quiet": True, **options})


def _by_path(result) -> dict[str, np.ndarray]:
    features = result.features()
    return dict(zip(features["path"], np.stack(features["features"].to_numpy())))


def test_the_fingerprint_changes_with_runtime_precision_and_resize(demo_root, tmp_path):
    config = _config(demo_root, tmp_path / "out", "cache")
    base = config.fingerprint("w", 224, "onnx", "onnxruntime", "pil")
    assert config.fingerprint("w", 224, "onnx", "openvino", "pil") != base
    assert dataclasses.replace(config, precision="bf16").fingerprint("w", 224, "onnx", "onnxruntime", "pil") != base
    assert config.fingerprint("w", 224, "onnx", "onnxruntime", "opencv") != base
    assert config.fingerprint("w", 224, "onnx", "onnxruntime", "pil") == base


def test_an_openvino_run_records_its_runtime_everywhere_and_equals_the_default_run(demo_root, spark, cache_dir,
                                                                                    finished_run, tmp_path):
    result = run(_config(demo_root, tmp_path / "ov", cache_dir, runtime="openvino"))
    out = Path(result.output)
    info = json.loads((out / "model_info" / "model_info.json").read_text())
    assert info["runtime"] == {"runtime": "openvino", "reason": "asked", "images_per_s": {}}
    assert info["precision"] == "fp32" and "openvino" in info["versions"]
    for stats_file in (out / "_shards").glob("part-*.json"):
        assert json.loads(stats_file.read_text())["runtime"]["runtime"] == "openvino"
    ours, default = _by_path(result), _by_path(finished_run)
    assert ours.keys() == default.keys()
    assert max(float(np.abs(ours[p] - default[p]).max()) for p in ours) < 1e-4

    refused = _config(demo_root, tmp_path / "ov", cache_dir, runtime="onnxruntime")
    with pytest.raises(FruitpipeError, match="another configuration"):
        run(refused)


@pytest.mark.skipif(not runtimes.has_native_bf16(), reason="bf16 needs a CPU with AVX512-BF16 or AMX")
def test_a_bf16_run_is_close_to_fp32_and_says_so(demo_root, spark, cache_dir, finished_run, tmp_path):
    result = run(_config(demo_root, tmp_path / "bf16", cache_dir, precision="bf16"))
    info = json.loads((Path(result.output) / "model_info" / "model_info.json").read_text())
    assert (info["precision"], info["model_precision"], info["runtime"]["runtime"]) == ("bf16", "fp32", "openvino")
    ours, default = _by_path(result), _by_path(finished_run)
    cosines = [float(ours[p] @ default[p] / np.linalg.norm(ours[p]) / np.linalg.norm(default[p])) for p in ours]
    assert min(cosines) > 0.99, min(cosines)


def test_a_runtime_that_cannot_run_the_precision_is_one_line(demo_root, cache_dir, tmp_path):
    with pytest.raises(FruitpipeError, match="--runtime onnxruntime cannot run bf16|bf16"):
        run(_config(demo_root, tmp_path / "bad", cache_dir, precision="bf16", runtime="onnxruntime"))
    assert not (tmp_path / "bad").exists()
