"""Model registry, weights resolution, ONNX export and ImageNet predictions with real weights."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skimage.data
import torch
from PIL import Image

from fruitpipe.errors import FruitpipeError
from fruitpipe.images import model_pixels, normalise, preprocess
from fruitpipe.models import (
    RANDOM_WEIGHTS,
    ExportedModel,
    ModelSpec,
    available_models,
    build_model,
    export_onnx,
    get_spec,
    imagenet_classes,
    predict_topk,
    resolve_weights,
)
from fruitpipe.models.efficientnet_lite import SameConv2d
from fruitpipe.models.export import GRAPH_VERSION
from fruitpipe.models.weights import url_env_var

LITE = "efficientnet_lite0"
MOBILENET = "mobilenet_v2"
CAT_CLASSES = range(281, 286)
COFFEE_CLASSES = (967, 968)


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [encode(skimage.data.chelsea(), "PNG"), encode(skimage.data.coffee(), "JPEG")]


@pytest.fixture()
def mobilenet_file(tmp_path: Path) -> tuple[bytes, torch.nn.Module]:
    """A randomly initialised MobileNetV2 saved the way torchvision checkpoints are: a bare state dict."""
    model = build_model(get_spec(MOBILENET), RANDOM_WEIGHTS)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue(), model


class WeightsServer:
    """A loopback HTTP server for files held in memory, counting the requests it answers."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"


@pytest.fixture()
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[WeightsServer]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    served = WeightsServer()
    served.thread.start()
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


def test_registry_lists_models_and_rejects_unknown_names() -> None:
    assert available_models() == [LITE, MOBILENET]
    with pytest.raises(FruitpipeError, match=f"unknown model 'resnet50'; known models: {LITE}, {MOBILENET}"):
        get_spec("resnet50")


def test_spec_preprocessing_comes_from_the_spec() -> None:
    spec = get_spec(LITE)
    assert spec.feature_dim == 1280
    prep = spec.preprocessing()
    assert (prep.size, prep.mean, prep.std) == (224, spec.mean, spec.std)
    assert spec.preprocessing(256).size == 256
    with pytest.raises(FruitpipeError, match="too small"):
        spec.preprocessing(16)


def test_imagenet_classes_are_in_logit_order() -> None:
    names = imagenet_classes()
    assert len(names) == 1000
    assert (names[0], names[285], names[967]) == ("tench", "Egyptian cat", "espresso")


@pytest.mark.parametrize("size", [7, 8, 15])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (3, 2), (5, 2), (1, 1)])
def test_same_padding_matches_onnx_same_upper(size: int, kernel: int, stride: int) -> None:
    """ONNX's auto_pad SAME_UPPER is TensorFlow's SAME: an independent reference for the padding arithmetic."""
    conv = SameConv2d(2, 3, kernel, size, stride=stride).eval()
    x = torch.randn(1, 2, size, size)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[stride, stride])
    graph = onnx.helper.make_graph(
        [node], "same", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, size, size])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [onnx.numpy_helper.from_array(conv.weight.detach().numpy(), "w")],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    (expected,) = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})
    with torch.no_grad():
        actual = conv(x).numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-5)


def test_packaged_lite_weights_are_verified(cache_dir: str) -> None:
    spec = get_spec(LITE)
    path, digest = resolve_weights(spec, None, cache_dir)
    assert digest == spec.weights_sha256 == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    tampered = dataclasses.replace(spec, weights_sha256="0" * 64)
    with pytest.raises(FruitpipeError, match=f"expected {'0' * 64}, got {digest}"):
        resolve_weights(tampered, None, cache_dir)


def test_lite0_real_weights_recognise_cat_and_espresso(photos: list[bytes], cache_dir: str) -> None:
    cat, coffee = predict_topk(photos, get_spec(LITE), None, cache_dir, top=5)
    assert cat[0][0] in CAT_CLASSES, cat
    assert coffee[0][0] in COFFEE_CLASSES, coffee
    names = imagenet_classes()
    for ranking in (cat, coffee):
        assert len(ranking) == 5
        assert [name for _, name, _ in ranking] == [names[label] for label, _, _ in ranking]
        probabilities = [probability for _, _, probability in ranking]
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6


def test_lite0_normalisation_fits_its_batch_norm_statistics(photos: list[bytes], cache_dir: str) -> None:
    """The spec's mean/std must put the stem's activations closer to the trained running statistics than
    ImageNet mean/std does: the evidence for choosing TF-Lite's (p - 127) / 128."""
    spec = get_spec(LITE)
    model = build_model(spec, resolve_weights(spec, None, cache_dir)[0])
    seen: list[torch.Tensor] = []
    model._bn0.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    imagenet = dataclasses.replace(spec, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

    def mismatch(candidate: ModelSpec) -> float:
        batch = np.stack([preprocess(data, candidate.preprocessing())[0] for data in photos])
        with torch.no_grad():
            model(torch.from_numpy(batch))
        activations = seen.pop()
        live = model._bn0.running_var > 1e-6
        shift = (activations.mean((0, 2, 3)) - model._bn0.running_mean) / model._bn0.running_var.sqrt()
        scale = (activations.var((0, 2, 3)) / model._bn0.running_var).log()
        return float(shift[live].abs().mean() + scale[live].abs().mean())

    assert mismatch(spec) < 0.7 * mismatch(imagenet)


def test_onnx_runtime_matches_torch(photos: list[bytes], cache_dir: str) -> None:
    spec = get_spec(LITE)
    exported = export_onnx(spec, None, cache_dir)
    prep = spec.preprocessing(exported.input_size)
    pixels = np.stack([model_pixels(data, prep)[0] for data in photos])
    session = ort.InferenceSession(exported.path, providers=["CPUExecutionProvider"])
    graph_inputs = [(i.name, i.type, i.shape[1:]) for i in session.get_inputs()]
    assert graph_inputs == [("pixels", "tensor(uint8)", [224, 224, 3])]
    features, logits = session.run(["features", "logits"], {"pixels": pixels})
    model = build_model(spec, resolve_weights(spec, None, cache_dir)[0])
    with torch.no_grad():
        normalised = np.stack([preprocess(data, prep)[0] for data in photos])
        torch_features, torch_logits = model(torch.from_numpy(normalised))
    assert features.shape == (2, spec.feature_dim) and logits.shape == (2, 1000)
    np.testing.assert_allclose(features, torch_features.numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, torch_logits.numpy(), atol=1e-4)


def test_onnx_runtime_folds_every_pad_into_its_convolution(cache_dir: str, tmp_path: Path) -> None:
    """The lean graph (issue 10): TF padding's Pads name their zero fill, so ONNX Runtime fuses each into the
    following Conv. Unfused, the five stride-2 Pads cost a copy and a layout change each: 1.2-1.4x slower."""
    exported = export_onnx(get_spec(LITE), None, cache_dir)
    pads = [node for node in onnx.load(exported.path).graph.node if node.op_type == "Pad"]
    assert len(pads) == 5 and all(len(node.input) == 3 and node.input[2] for node in pads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(exported.path, options, providers=["CPUExecutionProvider"])
    optimised = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    assert "Pad" not in optimised and optimised.count("Conv") == 49


def test_export_is_cached_and_reused(cache_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = get_spec(LITE)
    first = export_onnx(spec, None, cache_dir)
    assert Path(first.path).name == f"{LITE}-{spec.weights_sha256[:12]}-224-g{GRAPH_VERSION}.onnx"
    assert first.onnx_sha256 == hashlib.sha256(Path(first.path).read_bytes()).hexdigest()

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("exported again instead of reusing the cached file")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    assert export_onnx(spec, None, cache_dir) == first
    assert sorted(p.name for p in Path(first.path).parent.iterdir()) == [Path(first.path).name]


def test_random_mobilenet_is_deterministic_and_recorded(tmp_path: Path) -> None:
    spec = get_spec(MOBILENET)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    x = torch.from_numpy(np.stack([normalise(image, spec.preprocessing(64)) for image in pixels]))
    with torch.no_grad():
        first, second = (build_model(spec, RANDOM_WEIGHTS)(x)[0] for _ in range(2))
    assert torch.equal(first, second)
    exported = export_onnx(spec, RANDOM_WEIGHTS, str(tmp_path), input_size=64)
    assert (exported.weights_sha256, exported.input_size) == (RANDOM_WEIGHTS, 64)
    assert Path(exported.path).name == f"{MOBILENET}-random-64-g{GRAPH_VERSION}.onnx"
    (features,) = ort.InferenceSession(exported.path).run(["features"], {"pixels": pixels})
    np.testing.assert_allclose(features, first.numpy(), atol=1e-4)


def test_mobilenet_v2_has_torchvision_shape_and_names() -> None:
    model = build_model(get_spec(MOBILENET), RANDOM_WEIGHTS)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    keys = list(model.state_dict())
    assert len(keys) == 314
    assert {
        "features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight", "features.1.conv.2.bias",
        "features.2.conv.0.1.num_batches_tracked", "features.2.conv.2.weight", "features.17.conv.3.weight",
        "features.18.0.weight", "features.18.1.bias", "classifier.1.weight", "classifier.1.bias",
    } <= set(keys)


def test_torchvision_format_state_dict_loads_strictly(
    tmp_path: Path, mobilenet_file: tuple[bytes, torch.nn.Module]
) -> None:
    data, original = mobilenet_file
    path = tmp_path / "mobilenet_v2-local.pth"
    path.write_bytes(data)
    spec = get_spec(MOBILENET)
    resolved, digest = resolve_weights(spec, str(path), str(tmp_path / "cache"))
    assert (resolved, digest) == (str(path), hashlib.sha256(data).hexdigest())
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(build_model(spec, resolved)(x), original.eval()(x))

    state = torch.load(path, weights_only=True)
    state["features.1.conv.1.renamed"] = state.pop("features.1.conv.1.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(FruitpipeError, match=r"1 missing keys \(first: features.1.conv.1.weight\)"):
        build_model(spec, str(tmp_path / "renamed.pth"))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(FruitpipeError, match="is not a PyTorch state dict file"):
        build_model(spec, str(tmp_path / "notes.txt"))


def test_weights_from_an_fsspec_uri_are_copied_into_the_cache(
    tmp_path: Path, mobilenet_file: tuple[bytes, torch.nn.Module]
) -> None:
    data, _ = mobilenet_file
    with fsspec.open("memory://bucket/mobilenet.pth", "wb") as file:
        file.write(data)
    path, digest = resolve_weights(get_spec(MOBILENET), "memory://bucket/mobilenet.pth", str(tmp_path))
    assert digest == hashlib.sha256(data).hexdigest()
    assert Path(path).parent == tmp_path / "weights" and Path(path).read_bytes() == data
    with pytest.raises(FruitpipeError, match="weights file not found"):
        resolve_weights(get_spec(MOBILENET), str(tmp_path / "missing.pth"), str(tmp_path))


def test_default_mobilenet_weights_download_once(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch,
    mobilenet_file: tuple[bytes, torch.nn.Module],
) -> None:
    data, _ = mobilenet_file
    digest = hashlib.sha256(data).hexdigest()
    name = f"/mobilenet_v2-{digest[:8]}.pth"
    server.files[name] = data
    monkeypatch.setenv(url_env_var(MOBILENET), server.url(name))
    spec = get_spec(MOBILENET)

    path, got = resolve_weights(spec, None, str(tmp_path))
    assert (Path(path), got) == (tmp_path / "weights" / name.lstrip("/"), digest)
    assert resolve_weights(spec, None, str(tmp_path)) == (path, got)
    assert server.requests == [name]
    build_model(spec, path)


def test_wrong_sha256_is_refused_and_not_cached(
    tmp_path: Path, server: WeightsServer, monkeypatch: pytest.MonkeyPatch,
    mobilenet_file: tuple[bytes, torch.nn.Module],
) -> None:
    data, _ = mobilenet_file
    server.files["/mobilenet_v2-b0353104.pth"] = data
    monkeypatch.setenv(url_env_var(MOBILENET), server.url("/mobilenet_v2-b0353104.pth"))
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(FruitpipeError, match=f"sha256 mismatch .*: expected b0353104, got {actual}"):
        resolve_weights(get_spec(MOBILENET), None, str(tmp_path))
    assert list((tmp_path / "weights").iterdir()) == []


def test_offline_without_weights_says_what_to_do(tmp_path: Path, server: WeightsServer,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    spec = get_spec(MOBILENET)
    for url in (f"http://127.0.0.1:{closed_port}/mobilenet_v2-b0353104.pth", server.url("/missing-b0353104.pth")):
        monkeypatch.setenv(url_env_var(MOBILENET), url)
        with pytest.raises(FruitpipeError) as caught:
            export_onnx(spec, None, str(tmp_path))
        message = str(caught.value)
        assert "--weights" in message and "--model efficientnet_lite0" in message and url in message
        assert "\n" not in message
    assert "HTTP 404" in message
    assert not (tmp_path / "onnx").exists()


def test_specs_and_exports_unpickle_without_torch(cache_dir: str) -> None:
    """Executors have no torch or onnx: what the driver ships them must not need either."""
    spec = get_spec(MOBILENET)
    exported = ExportedModel("/x.onnx", spec.name, RANDOM_WEIGHTS, 224, "0" * 64)
    script = (
        "import pickle, sys\n"
        "sys.modules['torch'] = sys.modules['onnx'] = None\n"
        f"spec, exported = pickle.loads({pickle.dumps((spec, exported))!r})\n"
        "print(spec.preprocessing().mean, exported.input_size)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(0.485,", "0.456,", "0.406)", "224"]
