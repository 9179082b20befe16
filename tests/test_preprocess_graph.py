"""The exported graph takes uint8 pixels and normalises them itself (issue 10 part 4): its features equal those of
a graph fed today's float tensors, on real weights and both runtimes, for images of any size and mode; graphs
exported before (float "images" input) still run a shard; and the change of graph changes a run's fingerprint."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from fruitpipe import runtimes, sinks
from fruitpipe.config import RunConfig
from fruitpipe.extract import ExtractionSettings, process_shard
from fruitpipe.images import RESIZE_METHOD, image_format, model_pixels, normalise, preprocess
from fruitpipe.models import RANDOM_WEIGHTS, build_model, export_onnx, get_spec, resolve_weights
from fruitpipe.models.specs import ONNX_FEATURES, ONNX_INPUT, ONNX_LOGITS, ONNX_PIXELS
from fruitpipe.records import ImageRow
from fruitpipe.run_folder import FEATURES, RunFolder

pytest.importorskip("openvino", reason="openvino is not installed: pip install -c requirements.lock openvino")

SMALL_INPUT = 64


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _odd_images() -> list[bytes]:
    """Real-photo content at sizes and modes other than Fruits-360's 100 x 100 RGB JPEG."""
    photo = Image.fromarray(skimage.data.astronaut())
    rgba = photo.resize((120, 90)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((120, 90)))
    rotated = Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation: rotate 90 degrees
    return [_encode(photo.resize((150, 90)), "JPEG"),           # wide: centre-cropped
            _encode(photo.resize((40, 70)), "PNG"),             # tall and smaller than the input: upsampled
            _encode(photo.resize((1600, 1200)), "JPEG"),        # large: decoded at a reduced scale (draft)
            _encode(photo.convert("L"), "PNG"),                 # grayscale
            _encode(photo.convert("CMYK"), "JPEG"),             # CMYK
            _encode(rgba, "PNG"),                               # alpha, composited on white
            _encode(photo.resize((90, 130)), "JPEG", exif=rotated.tobytes())]  # turned upright


def _float_graph(network: torch.nn.Module, size: int, path: Path) -> bytes:
    """The network exported the way fruitpipe did before the graph took pixels: input "images" [N,3,S,S] float."""
    names = [ONNX_INPUT, ONNX_FEATURES, ONNX_LOGITS]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(network, (torch.zeros(1, 3, size, size),), path, dynamo=False, input_names=names[:1],
                          output_names=names[1:], dynamic_axes={name: {0: "batch"} for name in names},
                          opset_version=17)
    return path.read_bytes()


def _demo_jpegs(demo_root: Path, count: int) -> list[bytes]:
    paths = sorted(demo_root.glob("Training/*/*.jpg"))
    return [p.read_bytes() for p in paths[:: max(1, len(paths) // count)][:count]]


@pytest.fixture(scope="module")
def random_mobilenet(cache_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """Seeded random MobileNetV2 at 64 px (per-channel mean and std): the pixels graph and the float graph."""
    spec = get_spec("mobilenet_v2")
    pixels_graph = Path(export_onnx(spec, RANDOM_WEIGHTS, cache_dir, SMALL_INPUT).path).read_bytes()
    network = build_model(spec, RANDOM_WEIGHTS, SMALL_INPUT)
    return pixels_graph, _float_graph(network, SMALL_INPUT, tmp_path_factory.mktemp("float") / "mobilenet.onnx")


def test_real_weights_features_equal_the_float_path_on_both_runtimes(cache_dir: str, demo_root: Path) -> None:
    """Today's path is the network fed normalised float tensors (ONNX Runtime's float graph equals torch within
    1e-4, tests/test_models.py); the pixels graph on either runtime stays within 1e-3 of it on every feature."""
    spec = get_spec("efficientnet_lite0")
    exported = export_onnx(spec, None, cache_dir)
    prep = spec.preprocessing(exported.input_size)
    photos = [_encode(Image.fromarray(skimage.data.chelsea()), "PNG"),
              _encode(Image.fromarray(skimage.data.coffee()), "JPEG")]
    images = photos + _demo_jpegs(demo_root, 6)
    pixels = np.stack([model_pixels(data, prep)[0] for data in images])
    assert pixels.dtype == np.uint8 and pixels.shape == (8, 224, 224, 3)
    network = build_model(spec, resolve_weights(spec, None, cache_dir)[0])
    with torch.no_grad():
        today = network(torch.from_numpy(np.stack([preprocess(data, prep)[0] for data in images])))[0].numpy()
    for name in runtimes.RUNTIMES:
        graph = runtimes.load(Path(exported.path).read_bytes(), 1, "fp32", name)
        assert (graph.input_name, graph.input_size) == (ONNX_PIXELS, 224)
        np.testing.assert_allclose(graph.run(pixels), today, atol=1e-3, rtol=0, err_msg=name)


def test_images_of_any_size_and_mode_give_the_float_paths_features(random_mobilenet) -> None:
    pixels_graph, float_graph = random_mobilenet
    prep = get_spec("mobilenet_v2").preprocessing(SMALL_INPUT)
    images = _odd_images()
    pixels = np.stack([model_pixels(data, prep)[0] for data in images])
    tensors = np.stack([preprocess(data, prep)[0] for data in images])
    assert [image_format(data) for data in images] == [Image.open(io.BytesIO(data)).format for data in images]
    for name in runtimes.RUNTIMES:
        today = runtimes.load(float_graph, 1, "fp32", name)
        graph = runtimes.load(pixels_graph, 1, "fp32", name)
        assert (today.input_name, graph.input_name) == (ONNX_INPUT, ONNX_PIXELS)
        expected, features = today.run(tensors), graph.run(pixels)
        # Random weights give tiny features: compared relative to their largest.
        scale = np.abs(expected).max()
        np.testing.assert_allclose(features / scale, expected / scale, atol=1e-4, rtol=0, err_msg=name)


def test_a_graph_taking_float_images_still_runs_a_shard_and_has_another_fingerprint(
        random_mobilenet, demo_root: Path, tmp_path: Path) -> None:
    """Artifacts and run folders made before keep working (`transform`, `--model-file`), with the features of
    today's graph; a run cannot resume across the two, since the ONNX bytes are in the fingerprint."""
    prep = get_spec("mobilenet_v2").preprocessing(SMALL_INPUT)
    paths = sorted(str(p.relative_to(demo_root)) for p in demo_root.glob("Training/*/*.jpg"))[:6]
    rows = [ImageRow(image_id=f"id{i}", path=path, label=Path(path).parent.name, label_index=0, split="Training",
                     bytes=(demo_root / path).stat().st_size, shard_id=0, version="v") for i, path in enumerate(paths)]
    features, seconds = {}, {}
    for kind, graph in zip(("pixels", "float"), random_mobilenet):
        output = tmp_path / kind
        settings = ExtractionSettings(source=str(demo_root), output=str(output), preprocessing=prep,
                                      model_key=hashlib.sha256(graph).hexdigest(), batch_size=4, threads=1,
                                      read_timeout_s=30.0)
        stats = process_shard(0, rows, settings, lambda graph=graph: graph)
        assert (stats.ok, stats.failed) == (6, 0)
        features[kind] = sinks.vectors_matrix(RunFolder(str(output)).part(FEATURES, 0), "features")
        seconds[kind] = stats.seconds
    scale = np.abs(features["float"]).max()
    np.testing.assert_allclose(features["pixels"] / scale, features["float"] / scale, atol=1e-4, rtol=0)
    assert all(seconds[kind]["decode"] > 0 and seconds[kind]["resize"] > 0 for kind in seconds)
    config = RunConfig(source=str(demo_root), output=str(tmp_path / "run"), shard_size=8)
    fingerprints = {config.fingerprint(RANDOM_WEIGHTS, SMALL_INPUT, hashlib.sha256(graph).hexdigest(), "onnxruntime",
                                       RESIZE_METHOD)
                    for graph in random_mobilenet}
    assert len(fingerprints) == 2


def test_the_enlarging_resize_stays_within_one_level_of_pils_and_keeps_the_features(cache_dir: str,
                                                                                      demo_root: Path) -> None:
    """Enlarging is OpenCV's exact bilinear (a sixth of PIL's CPU): one rounding where PIL rounds after each of its
    two passes, so a pixel may sit one level from PIL's, never more; real-weight features stay as close to the PIL
    path's as a re-encode would move them, and chelsea and coffee keep their ImageNet top-1."""
    spec = get_spec("efficientnet_lite0")
    exported = export_onnx(spec, None, cache_dir)
    prep = spec.preprocessing(exported.input_size)
    photos = [Image.fromarray(skimage.data.chelsea()).resize((100, 100)),
              Image.fromarray(skimage.data.coffee()).resize((100, 100))]
    images = [_encode(photo, "PNG") for photo in photos] + _demo_jpegs(demo_root, 30)
    enlarged = np.stack([model_pixels(data, prep)[0] for data in images])
    with_pil = np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224),
                                                                                       Image.Resampling.BILINEAR))
                         for data in images])
    difference = np.abs(enlarged.astype(np.int16) - with_pil.astype(np.int16))
    assert difference.max() == 1 and 0 < (difference > 0).mean() < 0.2
    graph = runtimes.load(Path(exported.path).read_bytes(), 1, "fp32", runtimes.ONNXRUNTIME)
    ours, pils = graph.run(enlarged), graph.run(with_pil)
    cosine = (ours * pils).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(pils, axis=1))
    assert cosine.min() > 0.995, cosine.min()
    network = build_model(spec, resolve_weights(spec, None, cache_dir)[0])
    with torch.no_grad():
        logits = [network(torch.from_numpy(np.stack([normalise(p, prep) for p in batch])))[1].argmax(1).tolist()
                  for batch in (enlarged[:2], with_pil[:2])]
    assert logits[0] == logits[1]
