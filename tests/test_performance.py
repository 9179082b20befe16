"""The speed work changes no numbers: the JPEG fast path and the normalisation give PIL's exact pixels and the
spec's exact tensors; int8 is a separate, cached, close-to-fp32 model that a run records and never mixes with fp32.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from PIL import Image, ImageOps

from fruitpipe.config import build_config
from fruitpipe.errors import FruitpipeError
from fruitpipe.images import ImageDecodeError, Preprocessing, _plain_jpeg, decode_rgb, model_pixels, preprocess, to_rgb
from fruitpipe.inference import create_session, extract_features
from fruitpipe.models import export_onnx, get_spec
from fruitpipe.quantize import quantize_int8

SMALL_INPUT = 64
REPO = Path(__file__).resolve().parent.parent


def _demo_jpegs(demo_root: Path, count: int = 24) -> list[bytes]:
    paths = sorted(demo_root.glob("Training/*/*.jpg"))
    return [p.read_bytes() for p in paths[:: max(1, len(paths) // count)][:count]]


def _pil_decode(data: bytes, target_size: int) -> Image.Image:
    """The general path by hand: PIL with draft, EXIF rotation and mode conversion."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (target_size, target_size))
    image.load()
    return to_rgb(ImageOps.exif_transpose(image))


def _encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_fast_jpeg_path_gives_pils_pixels_and_size(demo_root: Path) -> None:
    for data in _demo_jpegs(demo_root):
        assert _plain_jpeg(data, 224) is not None
        image, size = decode_rgb(data, 224)
        assert size == (100, 100) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(_pil_decode(data, 224)))


def test_fast_path_declines_what_needs_pil(demo_root: Path) -> None:
    photo = Image.open(io.BytesIO(_demo_jpegs(demo_root, 1)[0])).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = photo.resize((120, 80))
    declined = {
        "exif rotation": _encode(wide, exif=exif.tobytes()),
        "grayscale": _encode(photo.convert("L")),
        "cmyk": _encode(photo.convert("CMYK")),
        "needs draft": _encode(photo.resize((900, 700))),
        "truncated": _encode(photo, quality=95)[:1500],
        "png": _encode(photo, "PNG"),
    }
    for name, data in declined.items():
        assert _plain_jpeg(data, 224) is None, name
    rotated, size = decode_rgb(declined["exif rotation"], 224)
    assert size == (120, 80) and rotated.size == (80, 120)
    big, size = decode_rgb(declined["needs draft"], 224)
    assert size == (900, 700) and big.size == (450, 350)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_rgb(declined["truncated"], 224)


def test_preprocess_is_the_specs_formula_bit_for_bit(demo_root: Path) -> None:
    prep = Preprocessing(224, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    scale, shift = prep.scale_and_shift()
    for data in _demo_jpegs(demo_root, 8):
        tensor, _ = preprocess(data, prep)
        # Enlarging 100 px to 224 is OpenCV's exact bilinear (images.RESIZE_METHOD).
        pixels = cv2.resize(np.asarray(_pil_decode(data, 224)), (224, 224), interpolation=cv2.INTER_LINEAR_EXACT)
        expected = pixels.transpose(2, 0, 1).astype(np.float32) * scale + shift
        assert tensor.dtype == np.float32 and tensor.flags.c_contiguous
        assert np.array_equal(tensor, expected)
        mean, std = np.reshape(prep.mean, (3, 1, 1)), np.reshape(prep.std, (3, 1, 1))
        assert np.abs(tensor - (pixels.transpose(2, 0, 1) / 255.0 - mean) / std).max() < 1e-5


@pytest.fixture(scope="module")
def int8_model(demo_root: Path, cache_dir: str):
    spec = get_spec("efficientnet_lite0")
    exported = export_onnx(spec, None, cache_dir, SMALL_INPUT)
    prep = spec.preprocessing(SMALL_INPUT)
    images = _demo_jpegs(demo_root, 16)
    path, sha = quantize_int8(exported.path, exported.onnx_sha256, prep, images, cache_dir)
    return exported, prep, images, path, sha


def test_int8_model_is_quantized_cached_and_distinct(int8_model, cache_dir: str) -> None:
    exported, prep, images, path, sha = int8_model
    assert sha != exported.onnx_sha256 and Path(path).parent == Path(exported.path).parent
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    built = os.stat(path).st_mtime_ns
    assert quantize_int8(exported.path, exported.onnx_sha256, prep, images, cache_dir) == (path, sha)
    assert os.stat(path).st_mtime_ns == built
    other_path, _ = quantize_int8(exported.path, exported.onnx_sha256, prep, images[:8], cache_dir)
    assert other_path != path


def test_int8_features_stay_close_to_fp32(int8_model, demo_root: Path) -> None:
    exported, prep, _, path, _ = int8_model
    batch = np.stack([model_pixels(data, prep)[0] for data in _demo_jpegs(demo_root, 40)[16:]])
    fp32 = extract_features(create_session(Path(exported.path).read_bytes(), 1), batch)
    int8 = extract_features(create_session(Path(path).read_bytes(), 1), batch)
    cosine = (fp32 * int8).sum(axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
    assert cosine.mean() > 0.97 and cosine.min() > 0.9
    assert not np.allclose(fp32, int8, atol=1e-4)


def test_int8_without_decodable_calibration_images_is_a_clear_error(int8_model, tmp_path: Path) -> None:
    exported, prep, _, _, _ = int8_model
    with pytest.raises(FruitpipeError, match="int8 needs decodable images"):
        quantize_int8(exported.path, exported.onnx_sha256, prep, [b"not a photo"], str(tmp_path))


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(FruitpipeError, match="unknown precision 'int4'"):
        build_config({}, {"source": "in", "output": "out", "precision": "int4"})
    done = subprocess.run([sys.executable, "-m", "fruitpipe.cli", "run", "in", "out", "--precision", "int4"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.spark
def test_int8_run_records_its_precision_and_is_not_resumed_as_fp32(demo_root: Path, spark, cache_dir: str,
                                                                   tmp_path: Path) -> None:
    from fruitpipe.pipeline import run

    values = {"source": str(demo_root), "output": str(tmp_path / "run"), "image_size": SMALL_INPUT, "pca_k": 5,
              "shard_size": 40, "cache_dir": cache_dir, "quiet": True}
    result = run(build_config({}, {**values, "precision": "int8"}))
    info = json.loads((tmp_path / "run" / "model_info" / "model_info.json").read_text())
    assert info["precision"] == "int8" and result.images_ok == result.images_listed > 0
    stored = onnx.load(str(tmp_path / "run" / "model" / "feature_extractor.onnx"))
    assert "QuantizeLinear" in {node.op_type for node in stored.graph.node}
    fp32 = export_onnx(get_spec("efficientnet_lite0"), None, cache_dir, SMALL_INPUT)
    assert info["onnx_sha256"] != fp32.onnx_sha256
    with pytest.raises(FruitpipeError, match="another configuration"):
        run(build_config({}, values))


@pytest.mark.slow
def test_quick_benchmark_prints_its_ratio(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "run_bench.py"), "--quick",
                           "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ratio_lines = [line for line in done.stdout.splitlines() if line.startswith("RATIO ")]
    assert len(ratio_lines) == 1
    report = json.loads((tmp_path / "out" / "results-quick.json").read_text())
    run = report["quick"]["run"]
    assert run["images"] == 1200 and 0 < run["images_per_second"] < report["quick"]["ceiling"] * 1.5
    assert run["peak_rss_bytes"] > 0
