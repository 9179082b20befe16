"""Image bytes -> what a model's graph takes, preprocessed exactly as its spec says: square uint8 RGB pixels at the
model's size (graphs that normalise inside, fruitpipe's exports) or float32 CHW tensors (graphs exported before).

Pure numpy/PIL (and simplejpeg for the fast JPEG path): no Spark, no torch, so every executor can run it.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

# A 10,000 x 10,000 photo is legitimate input; decompression bombs beyond this are refused.
Image.MAX_IMAGE_PIXELS = 200_000_000
# Pillow warns on the console (and raises only beyond twice the limit); decode_rgb makes every image over the limit
# its error row instead. A filter set once, because warnings.catch_warnings is not thread-safe and decoding runs
# in threads: a restore racing another thread's could leave the warning printing.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")

_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
# Enlarging (Fruits-360's 100 px to 224) is OpenCV's fixed-point resize, bit-exact on every CPU: a sixth of PIL's
# time, and the per-image CPU left outside inference is mostly this resize (BENCHMARKS.md). Its one rounding puts
# some pixels one level from PIL's two-pass result. Shrinking stays PIL's, which filters (antialiases) as it goes.
_ENLARGING = {"bilinear": cv2.INTER_LINEAR_EXACT, "nearest": cv2.INTER_NEAREST_EXACT}
# Part of a run's fingerprint (with the graph's sha): features resized another way are not resumed into this run.
RESIZE_METHOD = f"enlarge: OpenCV {cv2.__version__.split('.')[0]} exact ({', '.join(_ENLARGING)}), else PIL"
# OpenCV's own thread pool would compete with the runtime's threads for the task's cores.
cv2.setNumThreads(1)

MIN_SIDE = 8


class ImageDecodeError(ValueError):
    """The bytes are not an image fruitpipe can use; the message says why."""


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects: a square input side, how to resize, and how to normalise [0, 1] RGB."""

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def scale_and_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (scale, shift) so that uint8 pixel p maps to (p / 255 - mean) / std in one multiply-add."""
        std = np.asarray(self.std, dtype=np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        scale = (1.0 / (255.0 * std)).reshape(3, 1, 1)
        shift = (-mean / std).reshape(3, 1, 1)
        return scale.astype(np.float32), shift.astype(np.float32)


def decode_rgb(data: bytes, target_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode any PIL-readable image to 8-bit RGB, upright (EXIF orientation applied), with its stored size.

    With target_size, a large JPEG is decoded at a reduced scale (PIL draft) no smaller than target_size,
    which is much faster than decoding the full image and resizing it.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    plain = _plain_jpeg(data, target_size)
    if plain is not None:
        return plain
    try:
        image = Image.open(io.BytesIO(data))
        stored_size = image.size
        if stored_size[0] * stored_size[1] > Image.MAX_IMAGE_PIXELS:
            raise _too_large(stored_size[0] * stored_size[1])
        if target_size is not None and image.format == "JPEG":
            image.draft("RGB", (target_size, target_size))
        image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:  # beyond twice the limit Pillow refuses before we see the size
        found = _BOMB_PIXELS.search(str(exc))
        raise (_too_large(int(found.group(1))) if found else ImageDecodeError(f"image too large: {exc}")) from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image: no known image format in the bytes") from None
    except Exception as exc:  # PIL raises many types for corrupt data; all mean "not decodable"
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    if min(stored_size) < MIN_SIDE:
        raise ImageDecodeError(f"image too small: {stored_size[0]}x{stored_size[1]} (minimum {MIN_SIDE}x{MIN_SIDE})")
    image = ImageOps.exif_transpose(image)
    return to_rgb(image), stored_size


def _too_large(pixels: int) -> ImageDecodeError:
    return ImageDecodeError(f"image too large: {pixels} pixels (limit {Image.MAX_IMAGE_PIXELS})")


def _plain_jpeg(data: bytes, target_size: int | None) -> tuple[Image.Image, tuple[int, int]] | None:
    """The fast path: a colour JPEG without EXIF that PIL would decode at full scale, decoded by simplejpeg.

    Both are libjpeg-turbo with the same settings, so the pixels are identical; skipping PIL's format probing
    and plugin set-up halves decode time on small images (BENCHMARKS.md). None means: take the general path,
    which does every check and conversion (EXIF rotation, other modes, size limits, corrupt data).
    """
    if not data.startswith(b"\xff\xd8") or not _no_exif_before_scan(data):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace != "YCbCr" or min(width, height) < MIN_SIDE or width * height > Image.MAX_IMAGE_PIXELS:
        return None
    if target_size is not None and min(width // target_size, height // target_size) >= 2:
        return None
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None
    return Image.fromarray(pixels, mode="RGB"), (width, height)


def _no_exif_before_scan(data: bytes) -> bool:
    """True when the JPEG's segment headers reach the image data without an EXIF segment (nothing to rotate)."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xDA:
            return True
        if marker == 0xE1 and data[position + 4:position + 10] == b"Exif\x00\x00":
            return False
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return False


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert grayscale, palette, CMYK, alpha and 16-bit images to 8-bit RGB (alpha composited on white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit samples span 0..65535: scale by 257 (65535 -> 255), never by the image's own peak, which would
        # brighten a dark image.
        array = np.rint(np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_square(image: Image.Image, size: int, interpolation: str) -> np.ndarray:
    """Resize the shorter side to `size` and centre-crop to size x size; returns HWC uint8."""
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size[0] < size and interpolation in _ENLARGING:
        return cv2.resize(np.asarray(image, dtype=np.uint8), (size, size), interpolation=_ENLARGING[interpolation])
    if image.size != (size, size):
        image = image.resize((size, size), _INTERPOLATIONS[interpolation])
    return np.asarray(image, dtype=np.uint8)


def square_pixels(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A decoded image -> HWC uint8 RGB pixels, size x size, as the model's graph takes them. The resize stays
    here, on the host: the graph only normalises (models/export.py says why)."""
    return resize_square(image, prep.size, prep.interpolation)


def model_pixels(data: bytes, prep: Preprocessing) -> tuple[np.ndarray, tuple[int, int]]:
    """One image's bytes -> (square_pixels, stored (width, height))."""
    image, stored_size = decode_rgb(data, target_size=prep.size)
    return square_pixels(image, prep), stored_size


def normalise(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """HWC uint8 pixels -> the CHW float32 tensor (p / 255 - mean) / std that a graph without normalisation takes."""
    scale, shift = prep.scale_and_shift()
    # One output buffer, no float temporaries: astype-then-arithmetic took 5x as long, more than the decode
    # (BENCHMARKS.md). The float32 arithmetic is the same, bit for bit, as the exported graph's Mul then Add.
    tensor = np.empty((3, prep.size, prep.size), dtype=np.float32)
    np.multiply(pixels.transpose(2, 0, 1), scale, out=tensor)
    tensor += shift
    return tensor


def preprocess(data: bytes, prep: Preprocessing) -> tuple[np.ndarray, tuple[int, int]]:
    """One image's bytes -> (CHW float32 normalised tensor, stored (width, height)), for graphs that take "images"."""
    pixels, stored_size = model_pixels(data, prep)
    return normalise(pixels, prep), stored_size


def image_format(data: bytes) -> str:
    """The format name PIL gives the bytes ("" if none). A JPEG without EXIF (the fast path's kind) is named from
    its first bytes, PIL's own test, instead of opening it again: a fifth of its decode time. One with EXIF may be
    PIL's "MPO" (multi-picture files carry EXIF), so PIL names it."""
    if data.startswith(b"\xff\xd8\xff") and _no_exif_before_scan(data):
        return "JPEG"
    header = image_size(data)
    return header[2] if header else ""


def image_size(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, format) read from the header only, or None when the bytes are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size[0], image.size[1], str(image.format)
    except Exception:
        return None
