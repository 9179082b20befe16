"""Inference runtimes (issue 10): each gives ONNX Runtime fp32's features within its precision's tolerance on real
weights, auto's choice follows its cached probe, and single-thread OpenVINO tasks sharing a node are not pinned."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from fruitpipe import inference, runtimes
from fruitpipe.errors import FruitpipeError
from fruitpipe.images import model_pixels
from fruitpipe.models import build_model, export_onnx, get_spec, resolve_weights
from fruitpipe.quantize import quantize_int8

pytest.importorskip("openvino", reason="openvino is not installed: "
                    "pip install -c requirements.lock openvino")

LITE = "efficientnet_lite0"
CAT_CLASSES = range(281, 286)
COFFEE_CLASSES = (967, 968)
SMALL_INPUT = 64


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def _demo_jpegs(demo_root: Path, count: int) -> list[bytes]:
    paths = sorted(demo_root.glob("Training/*/*.jpg"))
    return [p.read_bytes() for p in paths[:: max(1, len(paths) // count)][:count]]


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def lite0(cache_dir: str, demo_root: Path) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
    """Real-weight EfficientNet-Lite0 at 224 px: ONNX bytes, a batch (chelsea, coffee, 6 demo images), and the
    classifier's weights and bias, so logits follow from any runtime's features."""
    spec = get_spec(LITE)
    exported = export_onnx(spec, None, cache_dir)
    prep = spec.preprocessing(exported.input_size)
    photos = [_encode(skimage.data.chelsea(), "PNG"), _encode(skimage.data.coffee(), "JPEG")]
    batch = np.stack([model_pixels(data, prep)[0] for data in photos + _demo_jpegs(demo_root, 6)])
    classifier = build_model(spec, resolve_weights(spec, None, cache_dir)[0])._fc
    return (Path(exported.path).read_bytes(), batch, classifier.weight.detach().numpy(),
            classifier.bias.detach().numpy())


@pytest.fixture(scope="module")
def small_int8(cache_dir: str, demo_root: Path) -> tuple[bytes, bytes, np.ndarray]:
    """Real-weight Lite0 at 64 px (fast), fp32 and its int8 QDQ model, and a batch of demo images."""
    spec = get_spec(LITE)
    exported = export_onnx(spec, None, cache_dir, SMALL_INPUT)
    prep = spec.preprocessing(SMALL_INPUT)
    images = _demo_jpegs(demo_root, 40)
    path, _ = quantize_int8(exported.path, exported.onnx_sha256, prep, images[:16], cache_dir)
    batch = np.stack([model_pixels(data, prep)[0] for data in images[16:]])
    return Path(exported.path).read_bytes(), Path(path).read_bytes(), batch


def test_the_pipelines_entry_points_still_run_onnx_runtime(lite0) -> None:
    model, batch, _, _ = lite0
    runtime = inference.session_for("lite0-test", lambda: model, 1)
    assert runtime is inference.session_for("lite0-test", lambda: b"not loaded again", 1)
    assert (runtime.name, runtime.precision, runtime.choice.reason) == ("onnxruntime", "fp32", "asked")
    features = inference.extract_features(runtime, batch[:2])
    assert features.shape == (2, 1280) and features.dtype == np.float32
    np.testing.assert_array_equal(features, inference.create_session(model, 1).run(batch[:2]))


def test_openvino_fp32_equals_onnx_runtime_fp32(lite0) -> None:
    model, batch, _, _ = lite0
    reference = runtimes.load(model, 1, "fp32", "onnxruntime").run(batch)
    runtime = runtimes.load(model, 1, "fp32", "openvino")
    # Without the explicit hint OpenVINO computes in bf16 wherever the CPU has bf16 instructions.
    assert str(runtime.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    np.testing.assert_allclose(runtime.run(batch), reference, atol=1e-4)


@pytest.mark.skipif(not runtimes.has_native_bf16(), reason="this CPU has no bf16 instructions (avx512_bf16/amx_bf16)")
def test_openvino_bf16_stays_close_and_keeps_the_imagenet_top1(lite0) -> None:
    model, batch, weight, bias = lite0
    reference = runtimes.load(model, 1, "fp32", "onnxruntime").run(batch)
    runtime = runtimes.load(model, 1, "bf16", "openvino")
    assert str(runtime.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'bfloat16'>"
    features = runtime.run(batch)
    assert _cosine(features, reference).min() >= 0.99
    assert not np.allclose(features, reference, atol=1e-4)
    cat, coffee = np.argmax(features[:2] @ weight.T + bias, axis=1)
    assert cat in CAT_CLASSES and coffee in COFFEE_CLASSES
    assert list(np.argmax(reference[:2] @ weight.T + bias, axis=1)) == [cat, coffee]


def test_bf16_is_refused_where_it_cannot_run_natively(lite0, monkeypatch: pytest.MonkeyPatch) -> None:
    model = lite0[0]
    with pytest.raises(FruitpipeError, match="bf16 runs only on OpenVINO"):
        runtimes.load(model, 1, "bf16", "onnxruntime")
    monkeypatch.setattr(runtimes, "_cpuinfo", lambda: ("Old CPU", frozenset({"avx2", "avx512f"})))
    for runtime in ("openvino", "auto"):
        with pytest.raises(FruitpipeError, match=r"needs a CPU with bf16 instructions .* \(Old CPU\)"):
            runtimes.load(model, 1, "bf16", runtime)
    with pytest.raises(FruitpipeError, match="unknown precision 'fp16'"):
        runtimes.load(model, 1, "fp16", "auto")
    with pytest.raises(FruitpipeError, match="unknown runtime 'tensorrt'"):
        runtimes.load(model, 1, "fp32", "tensorrt")


def test_int8_on_either_runtime_stays_close_to_fp32(small_int8) -> None:
    fp32_model, int8_model, batch = small_int8
    fp32 = runtimes.load(fp32_model, 1, "fp32", "onnxruntime").run(batch)
    for name in runtimes.RUNTIMES:
        int8 = runtimes.load(int8_model, 1, "int8", name).run(batch)
        cosine = _cosine(fp32, int8)
        assert cosine.mean() > 0.97 and cosine.min() > 0.9, name
        assert not np.allclose(fp32, int8, atol=1e-4), name


def _cached_choice(model: bytes, precision: str, cache_dir: Path, choice: str) -> Path:
    path = runtimes.probe_cache_path(hashlib.sha256(model).hexdigest(), precision, 1, 2, str(cache_dir))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"choice": choice, "images_per_s": {"onnxruntime": 100.0, "openvino": 150.0}}))
    return path


def test_auto_follows_its_cached_probe_without_probing(small_int8, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, batch = small_int8

    def no_probe(*args: object) -> None:
        raise AssertionError("probed although a probe result is cached")

    monkeypatch.setattr(runtimes, "probe", no_probe)
    for choice in ("openvino", "onnxruntime", "openvino"):
        _cached_choice(model, "fp32", tmp_path, choice)
        runtime = runtimes.load(model, 1, "fp32", "auto", cache_dir=str(tmp_path), batch_size=2)
        assert (runtime.name, runtime.precision, runtime.choice.reason) == (choice, "fp32", "cached probe")
        assert runtime.info()["choice"]["images_per_s"] == {"onnxruntime": 100.0, "openvino": 150.0}
    assert runtime.run(batch).shape == (len(batch), 1280)
    # The key holds the CPU and the runtime versions: another CPU or version probes again.
    monkeypatch.setattr(runtimes, "_cpuinfo", lambda: ("Other CPU", frozenset({"avx2"})))
    with pytest.raises(AssertionError, match="probed although"):
        runtimes.load(model, 1, "fp32", "auto", cache_dir=str(tmp_path), batch_size=2)


def test_auto_probes_once_then_keeps_its_choice(small_int8, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = small_int8[0]
    first = runtimes.load(model, 1, "fp32", "auto", cache_dir=str(tmp_path), batch_size=2)
    assert first.choice.reason == "probe" and set(first.choice.images_per_s) == set(runtimes.RUNTIMES)
    (probe_file,) = (tmp_path / "runtime-probes").glob("*.json")
    recorded = json.loads(probe_file.read_text())
    assert recorded["choice"] == first.name and recorded["cpu"] == runtimes.cpu_model()
    monkeypatch.setattr(runtimes, "probe", lambda *args: pytest.fail("probed twice"))
    again = runtimes.load(model, 1, "fp32", "auto", cache_dir=str(tmp_path), batch_size=2)
    assert (again.name, again.choice.reason) == (first.name, "cached probe")


def test_auto_without_openvino_runs_onnx_runtime(small_int8, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    runtime = runtimes.load(small_int8[0], 1, "fp32", "auto", cache_dir=str(tmp_path))
    assert (runtime.name, runtime.choice.reason) == ("onnxruntime", "only candidate")
    with pytest.raises(FruitpipeError, match="needs openvino, which is not installed: pip install"):
        runtimes.load(small_int8[0], 1, "fp32", "openvino")
    assert not (tmp_path / "runtime-probes").exists()


def _threads_pinned_to_one_core() -> list[str]:
    pinned = []
    for status in glob.glob("/proc/self/task/*/status"):
        with open(status, encoding="utf-8") as handle:
            allowed = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("Cpus_allowed_list"))
        if "," not in allowed and "-" not in allowed:
            pinned.append(allowed)
    return pinned


def test_single_thread_openvino_tasks_sharing_a_node_are_not_pinned(small_int8) -> None:
    model, _, batch = small_int8
    tasks = [runtimes.load(model, 1, "fp32", "openvino", tasks_per_node=2) for _ in range(2)]
    for task in tasks:
        task.run(batch)
        assert task.compiled.get_property("ENABLE_CPU_PINNING") is False
        assert task.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert task.compiled.get_property("NUM_STREAMS") == 1
        assert task.info()["cpu_pinning"] is False
    if glob.glob("/proc/self/task/*/status"):
        assert _threads_pinned_to_one_core() == []
    assert runtimes.load(model, 1, "fp32", "openvino").compiled.get_property("ENABLE_CPU_PINNING") is False
    alone = runtimes.load(model, 2, "fp32", "openvino", tasks_per_node=1)
    assert alone.compiled.get_property("ENABLE_CPU_PINNING") is True
