"""The report's photos: read in parallel through fruitpipe.storage, shrunk to small WebP, embedded once each.

A photo can appear in several sections (its class strip, the PCA map, a confusion); it is read and encoded once
and drawn as a CSS class whose background is its data URI, so the page carries each photo's bytes one time and
the map's hover only swaps a class name. A photo that cannot be read or decoded gets the placeholder class:
one bad photo never fails the report, and a store that stays unreachable (its retries spent) is not asked again
for the rest of its photos.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fruitpipe.errors import FruitpipeError
from fruitpipe.images import decode_rgb
from fruitpipe.storage import Location, StorageUnavailable, locate, read_bytes

THUMBNAIL_PX = 64
WEBP_QUALITY = 65
READ_THREADS = 16
PLACEHOLDER = "missing"


@dataclass(frozen=True, order=True)
class Photo:
    """One image as the run's tables name it: the source root and the path relative to it."""

    source: str
    path: str


def thumbnail(data: bytes) -> bytes:
    """The image's WebP thumbnail, at most THUMBNAIL_PX on its longer side (JPEGs decoded at reduced scale)."""
    image, _ = decode_rgb(data, THUMBNAIL_PX)
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    image.save(buffer, "WEBP", quality=WEBP_QUALITY, method=4)
    return buffer.getvalue()


class Thumbnails:
    """Encoded photos by Photo (None: unreadable), each named by a CSS class."""

    def __init__(self, encoded: dict[Photo, bytes | None]) -> None:
        self._encoded = encoded
        self._classes = {photo: f"p{number}" for number, photo in enumerate(sorted(encoded))
                         if encoded[photo] is not None}

    def css_class(self, photo: Photo) -> str:
        """The class drawing `photo`, or the placeholder's for a photo missing, unreadable or never read."""
        return self._classes.get(photo, PLACEHOLDER)

    def tag(self, photo: Photo, title: str) -> str:
        """One photo as an inline element (the title shows on hover)."""
        return f'<span class="ph {self.css_class(photo)}" role="img" title="{html.escape(title)}"></span>'

    def style(self) -> str:
        """The CSS rules holding every photo's bytes."""
        return "\n".join(f".{name}{{background-image:url(data:image/webp;base64,{_base64(self._encoded[photo])})}}"
                         for photo, name in self._classes.items())

    @property
    def missing(self) -> int:
        """How many photos show the placeholder."""
        return sum(data is None for data in self._encoded.values())

    def __len__(self) -> int:
        return len(self._encoded)


def _base64(data: bytes | None) -> str:
    return base64.b64encode(data or b"").decode("ascii")


def read_thumbnails(photos: Iterable[Photo], threads: int = READ_THREADS) -> Thumbnails:
    """Read and encode every distinct photo on `threads` threads (reads wait on storage, decodes release the GIL)."""
    wanted = sorted(set(photos))
    locations = {source: locate(source) for source in {photo.source for photo in wanted}}
    if not wanted:
        return Thumbnails({})
    unreachable: set[str] = set()
    with ThreadPoolExecutor(max_workers=min(threads, len(wanted)), thread_name_prefix="thumbnails") as pool:
        encoded = list(pool.map(lambda photo: _read(locations[photo.source], photo, unreachable), wanted))
    return Thumbnails(dict(zip(wanted, encoded)))


def _read(location: Location, photo: Photo, unreachable: set[str]) -> bytes | None:
    if photo.source in unreachable:
        return None
    try:
        return thumbnail(read_bytes(location, location.join(photo.path)))
    except StorageUnavailable:
        unreachable.add(photo.source)
        return None
    except (OSError, ValueError, FruitpipeError):  # missing, unreadable or not an image (ImageDecodeError)
        return None
