"""A synthetic Fruits-360-like dataset, because the real one cannot be downloaded where fruitpipe is tested.

Each class is a procedurally drawn fruit (shape, colours, surface texture, stem) photographed on a white
background from a rotating viewpoint, so that CNN features of one class cluster together. Every image is a pure
function of (seed, split, class name, index): the bytes do not depend on how many classes are requested or on
how many worker processes draw them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import simplejpeg

from fruitpipe.config import SPLITS
from fruitpipe.errors import FruitpipeError

SIZE = 100
JPEG_QUALITY = 95
MARKER = ".fruitpipe-demo.json"
_FILE_NAME = re.compile(r"(?:r2?_)?\d+_100\.jpg")
_CHUNK = 64


@dataclass(frozen=True)
class DemoDatasetSummary:
    """What generate_demo_dataset wrote, for logs and for the CLI's one-line report."""

    root: str
    classes: list[str]
    training_images: int
    test_images: int
    seconds: float


@dataclass(frozen=True)
class _Look:
    """A class's appearance: outline, colours and how they mix, surface pattern, what sticks out on top."""

    shape: str
    size: float
    base: str
    second: str
    blend: str
    texture: str
    texture_colour: str
    stem: str
    gloss: float


# shape, size (fraction of the frame), base colour, second colour, how the second colour is placed,
# surface texture and its colour, stem kind, glossiness.
_LOOKS: dict[str, _Look] = {
    name: _Look(*spec)
    for name, spec in {
        "Apple Braeburn": ("round", 0.80, "#b3372c", "#d8a044", "side", "streaks", "#7d1f1a", "stem", 0.5),
        "Apple Crimson Snow": ("round", 0.82, "#9c1d2a", "#c8485a", "side", "speckle", "#f0d8c0", "stem", 0.5),
        "Apple Golden 1": ("round", 0.80, "#e3c34a", "#c9b040", "none", "speckle", "#a88a30", "stem", 0.4),
        "Apple Golden 2": ("round", 0.76, "#efd36a", "#d9a54a", "side", "none", "#000000", "stem", 0.45),
        "Apple Golden 3": ("oval", 0.80, "#d6c248", "#b7b84a", "cap", "speckle", "#8f8a35", "gstem", 0.35),
        "Apple Granny Smith": ("round", 0.80, "#8cc04a", "#b5d36a", "side", "speckle", "#d8eaa0", "stem", 0.5),
        "Apple Pink Lady": ("round", 0.78, "#e07a7a", "#e8c070", "side", "streaks", "#c04848", "stem", 0.5),
        "Apple Red 1": ("round", 0.82, "#c0242a", "#8e1620", "side", "none", "#000000", "stem", 0.6),
        "Apple Red 2": ("round", 0.78, "#b22d3a", "#e2b060", "cap", "streaks", "#7a1520", "stem", 0.45),
        "Apple Red 3": ("oval", 0.74, "#a51e2a", "#d04a40", "mottle", "speckle", "#e0b070", "gstem", 0.4),
        "Apple Red Delicious": ("pear", 0.80, "#8a1020", "#b83040", "cap", "streaks", "#5a0a14", "stem", 0.55),
        "Apple Red Yellow 1": ("round", 0.80, "#d04a30", "#e8c850", "side", "streaks", "#a02820", "stem", 0.45),
        "Apple Red Yellow 2": ("round", 0.80, "#e8c850", "#c83a2a", "cap", "speckle", "#f0e090", "stem", 0.45),
        "Apricot": ("round", 0.70, "#f0a040", "#e06a30", "side", "speckle", "#c05020", "none", 0.3),
        "Avocado": ("pear", 0.85, "#3e5a22", "#5b7a2e", "mottle", "grain", "#2a3a15", "stem", 0.2),
        "Avocado ripe": ("pear", 0.82, "#2a2420", "#3e3228", "mottle", "grain", "#151210", "stem", 0.25),
        "Banana": ("banana", 0.95, "#f2d23c", "#b7c040", "cap", "speckle", "#5a4020", "gstem", 0.3),
        "Banana Lady Finger": ("banana", 0.70, "#e9cf58", "#c8a848", "none", "speckle", "#6a4a20", "stem", 0.25),
        "Banana Red": ("banana", 0.90, "#9c3a3a", "#6e2a2a", "none", "grain", "#4a1a1a", "stem", 0.3),
        "Beetroot": ("round", 0.78, "#6a1530", "#8a3050", "mottle", "grain", "#3a0a18", "gstem", 0.15),
        "Blueberry": ("flat", 0.50, "#3a4a80", "#6a7aa8", "mottle", "none", "#000000", "calyx", 0.2),
        "Cactus fruit": ("oval", 0.80, "#6a8a3a", "#c04860", "cap", "speckle", "#e0d890", "none", 0.2),
        "Cantaloupe 1": ("round", 0.92, "#c8b07a", "#a89460", "none", "net", "#e8dcb8", "none", 0.1),
        "Cantaloupe 2": ("oval", 0.92, "#a8a868", "#c8b07a", "mottle", "net", "#e0d8b0", "stem", 0.1),
        "Carambula": ("star", 0.88, "#e8d040", "#b8c040", "cap", "ribs", "#a89020", "none", 0.5),
        "Cauliflower": ("irregular", 0.92, "#f0ead0", "#d8d0a8", "mottle", "bumps", "#b8b088", "none", 0.1),
        "Cherry 1": ("round", 0.62, "#8a1020", "#b02030", "side", "none", "#000000", "stem", 0.8),
        "Cherry 2": ("heart", 0.66, "#a01828", "#c83848", "cap", "none", "#000000", "stem", 0.8),
        "Cherry Rainier": ("round", 0.64, "#e8c060", "#d85a48", "side", "none", "#000000", "stem", 0.7),
        "Cherry Wax Black": ("round", 0.62, "#3a0a14", "#5a1420", "none", "none", "#000000", "gstem", 0.9),
        "Cherry Wax Red": ("round", 0.64, "#c01020", "#e03040", "none", "none", "#000000", "gstem", 0.9),
        "Cherry Wax Yellow": ("round", 0.64, "#f0c840", "#f09040", "side", "none", "#000000", "gstem", 0.9),
        "Chestnut": ("heart", 0.80, "#6a3a1c", "#c8a070", "cap", "streaks", "#4a2410", "none", 0.6),
        "Clementine": ("flat", 0.76, "#f08020", "#f09a30", "none", "speckle", "#d86a10", "none", 0.35),
        "Cocos": ("round", 0.92, "#6a4a2c", "#8a6a44", "mottle", "grain", "#3a2818", "none", 0.05),
        "Corn": ("long", 0.98, "#f0c83c", "#e8b030", "none", "bumps", "#c89020", "none", 0.3),
        "Corn Husk": ("long", 0.98, "#c8c878", "#8aa048", "side", "streaks", "#7a8a40", "gstem", 0.1),
        "Cucumber Ripe": ("long", 0.92, "#c89a50", "#a87838", "mottle", "net", "#e8c890", "stem", 0.1),
        "Cucumber Ripe 2": ("long", 0.90, "#d8b060", "#b08848", "cap", "grain", "#7a5a30", "stem", 0.15),
        "Dates": ("oval", 0.74, "#6a2a14", "#9a4a20", "mottle", "streaks", "#40160a", "none", 0.6),
        "Eggplant": ("pear", 0.95, "#3a1a40", "#5a2a60", "none", "none", "#000000", "calyx", 0.85),
        "Fig": ("pear", 0.78, "#5a3048", "#7a5a40", "cap", "speckle", "#b09070", "gstem", 0.2),
        "Ginger Root": ("irregular", 0.92, "#c8a070", "#a88050", "mottle", "grain", "#7a5a38", "none", 0.1),
        "Granadilla": ("oval", 0.80, "#e8a040", "#f0c060", "mottle", "speckle", "#f8e0a0", "gstem", 0.4),
        "Grape Blue": ("oval", 0.66, "#2a2a58", "#4a4a80", "mottle", "none", "#000000", "stem", 0.3),
        "Grape Pink": ("oval", 0.66, "#b04a60", "#d08890", "mottle", "none", "#000000", "stem", 0.45),
        "Grape White": ("oval", 0.64, "#c8d080", "#e0e0a0", "side", "none", "#000000", "stem", 0.5),
        "Grape White 2": ("round", 0.64, "#b8c868", "#d8d890", "side", "speckle", "#e8e8b0", "stem", 0.5),
        "Grape White 3": ("oval", 0.60, "#a8c060", "#c8d888", "cap", "none", "#000000", "gstem", 0.55),
        "Grape White 4": ("round", 0.60, "#d8d090", "#c0b870", "mottle", "grain", "#a09860", "stem", 0.45),
        "Grapefruit Pink": ("round", 0.90, "#f0a070", "#e87860", "side", "speckle", "#d86848", "none", 0.35),
        "Grapefruit White": ("round", 0.90, "#f0dc70", "#e8c858", "none", "speckle", "#d0b040", "none", 0.35),
        "Guava": ("pear", 0.82, "#a8c860", "#e0d880", "side", "speckle", "#80a040", "stem", 0.25),
        "Hazelnut": ("cone", 0.66, "#9a6030", "#c89860", "cap", "streaks", "#6a3c18", "none", 0.35),
        "Huckleberry": ("round", 0.58, "#2a2040", "#5a5080", "mottle", "none", "#000000", "calyx", 0.35),
        "Kaki": ("flat", 0.85, "#f08a20", "#e06010", "none", "none", "#000000", "calyx", 0.6),
        "Kiwi": ("oval", 0.84, "#8a6a3a", "#a08048", "mottle", "grain", "#5a4020", "none", 0.05),
        "Kohlrabi": ("round", 0.85, "#a8c878", "#d0e0a8", "cap", "streaks", "#789850", "gstem", 0.3),
        "Kumquats": ("oval", 0.62, "#f09020", "#f0a838", "none", "speckle", "#d87010", "gstem", 0.5),
        "Lemon": ("oval", 0.82, "#f5dc38", "#e8d040", "none", "speckle", "#d8b820", "none", 0.45),
        "Lemon Meyer": ("round", 0.80, "#f0c030", "#e8a828", "side", "speckle", "#d09018", "none", 0.45),
        "Limes": ("round", 0.74, "#5a9a30", "#7ab040", "side", "speckle", "#3a7a20", "none", 0.45),
        "Lychee": ("heart", 0.66, "#c03a40", "#e07060", "mottle", "scales", "#7a1a20", "stem", 0.1),
        "Mandarine": ("flat", 0.80, "#f07818", "#f09828", "none", "speckle", "#d05a08", "gstem", 0.35),
        "Mango": ("oval", 0.90, "#c8c040", "#e07a40", "side", "speckle", "#a0a030", "none", 0.35),
        "Mango Red": ("oval", 0.90, "#b02a40", "#d8a040", "cap", "speckle", "#e0c060", "none", 0.4),
        "Mangostan": ("flat", 0.78, "#4a1830", "#6a2a48", "none", "none", "#000000", "calyx", 0.5),
        "Maracuja": ("round", 0.76, "#4a2040", "#6a3050", "mottle", "speckle", "#a07890", "none", 0.3),
        "Melon Piel de Sapo": ("oval", 0.98, "#6a9a38", "#c8c060", "mottle", "stripes", "#3a6a20", "none", 0.25),
        "Mulberry": ("oval", 0.62, "#2a1020", "#4a1a30", "none", "bumps", "#100408", "gstem", 0.4),
        "Nectarine": ("round", 0.80, "#c82a30", "#f0b040", "side", "speckle", "#f0c060", "none", 0.5),
        "Nectarine Flat": ("flat", 0.84, "#b83040", "#e8a040", "side", "none", "#000000", "none", 0.45),
        "Nut Forest": ("round", 0.64, "#a06a38", "#c89058", "cap", "streaks", "#6a4020", "none", 0.3),
        "Nut Pecan": ("oval", 0.70, "#8a5028", "#a06838", "mottle", "streaks", "#3a1a08", "none", 0.3),
        "Onion Red": ("round", 0.86, "#8a2a48", "#c07090", "side", "streaks", "#5a1030", "stem", 0.3),
        "Onion Red Peeled": ("round", 0.84, "#b05a80", "#e0b0c8", "side", "streaks", "#8a3a60", "none", 0.45),
        "Onion White": ("round", 0.86, "#e8dcc0", "#c8b890", "cap", "streaks", "#b8a880", "stem", 0.3),
        "Orange": ("round", 0.88, "#f08818", "#f8a830", "none", "speckle", "#d86808", "none", 0.35),
        "Papaya": ("pear", 0.95, "#e0a038", "#88a040", "cap", "speckle", "#c08020", "stem", 0.35),
        "Passion Fruit": ("round", 0.76, "#3a2040", "#6a4060", "mottle", "speckle", "#b098a8", "none", 0.3),
        "Peach": ("round", 0.84, "#e88850", "#c83a38", "side", "grain", "#f0b080", "none", 0.2),
        "Peach 2": ("round", 0.84, "#d85a40", "#f0c070", "mottle", "grain", "#f8d8a0", "none", 0.2),
        "Peach Flat": ("flat", 0.86, "#e8a060", "#c85048", "side", "none", "#000000", "none", 0.2),
        "Pear": ("pear", 0.88, "#c8c848", "#a8b838", "none", "speckle", "#887a30", "stem", 0.25),
        "Pear 2": ("pear", 0.88, "#d8c070", "#c89040", "side", "speckle", "#a07030", "stem", 0.25),
        "Pear Abate": ("pear", 0.96, "#c8a868", "#a87a48", "mottle", "grain", "#8a6a3a", "stem", 0.2),
        "Pear Forelle": ("pear", 0.86, "#d8c050", "#c83a30", "side", "speckle", "#e08040", "stem", 0.3),
        "Pear Kaiser": ("pear", 0.92, "#a87040", "#886038", "mottle", "grain", "#6a4828", "stem", 0.15),
        "Pear Monster": ("pear", 0.98, "#b8c048", "#d8d070", "none", "speckle", "#808828", "stem", 0.3),
        "Pear Red": ("pear", 0.88, "#b83838", "#d8a040", "cap", "speckle", "#f0c060", "stem", 0.4),
        "Pear Stone": ("pear", 0.86, "#a8b870", "#c8c890", "mottle", "speckle", "#607040", "stem", 0.25),
        "Pear Williams": ("pear", 0.90, "#e0d060", "#a8c050", "side", "speckle", "#a09030", "stem", 0.3),
        "Pepino": ("oval", 0.84, "#e8dca0", "#8a5a9a", "cap", "stripes", "#8a4a9a", "none", 0.5),
        "Pepper Green": ("lobed", 0.90, "#2a7a20", "#3a9028", "none", "ribs", "#1a5010", "gstem", 0.8),
        "Pepper Orange": ("lobed", 0.88, "#f07818", "#f89838", "none", "ribs", "#b04a08", "gstem", 0.8),
        "Pepper Red": ("lobed", 0.90, "#c01818", "#e03028", "none", "ribs", "#800808", "gstem", 0.8),
        "Pepper Yellow": ("lobed", 0.88, "#f0c818", "#f8e050", "none", "ribs", "#b08808", "gstem", 0.8),
        "Physalis": ("round", 0.62, "#f0a020", "#f8c048", "none", "none", "#000000", "none", 0.5),
        "Physalis with Husk": ("heart", 0.84, "#c8a860", "#e0c890", "mottle", "streaks", "#8a7040", "gstem", 0.1),
        "Pineapple": ("oval", 0.96, "#c89a40", "#a08030", "mottle", "scales", "#6a5018", "crown", 0.2),
        "Pineapple Mini": ("oval", 0.80, "#d8a848", "#b89038", "mottle", "scales", "#7a5a20", "crown", 0.2),
        "Pitahaya Red": ("oval", 0.86, "#d83a70", "#a8c048", "none", "scales", "#90c040", "crown", 0.4),
        "Plum": ("round", 0.74, "#5a1838", "#8a3a5a", "side", "none", "#000000", "stem", 0.4),
        "Plum 2": ("oval", 0.72, "#3a2858", "#6a5a90", "mottle", "none", "#000000", "stem", 0.3),
        "Plum 3": ("round", 0.76, "#8a2030", "#c86048", "side", "speckle", "#e0a070", "gstem", 0.4),
        "Pomegranate": ("round", 0.90, "#b02830", "#d86848", "side", "speckle", "#e8a080", "calyx", 0.4),
        "Pomelo Sweetie": ("round", 0.95, "#98b838", "#c8d050", "side", "speckle", "#708a20", "none", 0.35),
        "Potato Red": ("irregular", 0.84, "#a84848", "#c87868", "mottle", "speckle", "#6a2828", "none", 0.1),
        "Potato Red Washed": ("irregular", 0.82, "#c05050", "#e09080", "mottle", "speckle", "#803030", "none", 0.3),
        "Potato Sweet": ("long", 0.90, "#a85a38", "#c8784a", "mottle", "grain", "#6a3018", "none", 0.15),
        "Potato White": ("irregular", 0.84, "#d8c898", "#c8b078", "mottle", "speckle", "#8a7048", "none", 0.15),
        "Quince": ("pear", 0.88, "#e0c840", "#c8b030", "mottle", "grain", "#a89020", "stem", 0.2),
        "Rambutan": ("round", 0.78, "#c02828", "#e05040", "none", "scales", "#4a8a20", "none", 0.1),
        "Raspberry": ("round", 0.70, "#c8203a", "#e04858", "none", "bumps", "#80101e", "none", 0.2),
        "Redcurrant": ("round", 0.56, "#d01828", "#f04850", "none", "none", "#000000", "gstem", 0.9),
        "Salak": ("cone", 0.80, "#6a3820", "#8a5030", "none", "scales", "#3a1a08", "none", 0.3),
        "Strawberry": ("cone", 0.86, "#d8202a", "#f04040", "none", "speckle", "#f0d040", "crown", 0.6),
        "Strawberry Wedge": ("heart", 0.86, "#e03040", "#f8d0d0", "cap", "speckle", "#f0e0a0", "calyx", 0.4),
        "Tamarillo": ("oval", 0.82, "#a81820", "#d04020", "side", "none", "#000000", "gstem", 0.7),
        "Tangelo": ("round", 0.86, "#f06a18", "#f08828", "none", "speckle", "#c84a08", "none", 0.35),
        "Tomato 1": ("flat", 0.88, "#d81818", "#e83828", "none", "none", "#000000", "calyx", 0.7),
        "Tomato 2": ("round", 0.86, "#c82820", "#e06030", "side", "speckle", "#f08050", "calyx", 0.6),
        "Tomato 3": ("flat", 0.90, "#b01818", "#d03020", "cap", "ribs", "#801010", "calyx", 0.6),
        "Tomato 4": ("round", 0.84, "#e03828", "#f07040", "mottle", "none", "#000000", "gstem", 0.7),
        "Tomato Cherry Red": ("round", 0.62, "#e01818", "#f04028", "none", "none", "#000000", "gstem", 0.85),
        "Tomato Heart": ("heart", 0.92, "#d02020", "#e85030", "none", "ribs", "#901010", "calyx", 0.6),
        "Tomato Maroon": ("round", 0.86, "#6a1818", "#8a2a20", "side", "none", "#000000", "calyx", 0.7),
        "Tomato Yellow": ("round", 0.70, "#f0c020", "#f8d848", "none", "none", "#000000", "calyx", 0.7),
        "Tomato not Ripened": ("round", 0.84, "#78a840", "#c8c858", "side", "ribs", "#5a8a28", "calyx", 0.6),
        "Walnut": ("irregular", 0.78, "#b08858", "#8a6840", "mottle", "streaks", "#5a4020", "none", 0.1),
        "Watermelon": ("oval", 0.98, "#3a7a28", "#1a4a18", "none", "stripes", "#142e10", "stem", 0.2),
    }.items()
}

FRUITS_360_CLASSES: tuple[str, ...] = tuple(sorted(_LOOKS))

# Picked first so that even a small demo has visually varied classes, names with spaces and an "Apple*" preset.
_PREFERRED = (
    "Apple Braeburn", "Apple Red 1", "Banana", "Apple Golden 1", "Cherry Wax Red", "Apple Granny Smith",
    "Pepper Green", "Walnut", "Strawberry", "Kiwi", "Lemon", "Watermelon", "Eggplant", "Pineapple",
    "Apple Pink Lady", "Avocado", "Orange", "Corn", "Pear", "Blueberry",
)

_STEM_COLOURS = {"stem": "#5a3a1e", "gstem": "#5a7a2a", "calyx": "#3f6e24", "crown": "#3a6a28"}
_STEM_LENGTH = {"none": 0.0, "stem": 0.24, "gstem": 0.26, "calyx": 0.15, "crown": 0.5}


def _stable_hash(text: str) -> int:
    """A 64-bit hash that, unlike hash(), is the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _rgb(hex_colour: str) -> np.ndarray:
    """A (3, 1, 1) float32 colour, shaped to broadcast over channel-first (3, H, W) images."""
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32).reshape(3, 1, 1)


def _smoothstep(lo: float | np.ndarray, hi: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _length(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sqrt(a² + b²): several times faster than np.hypot, and the overflow it guards against cannot happen here."""
    return np.sqrt(a * a + b * b)


def _cell_hash(cu: np.ndarray, cv: np.ndarray, salt: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three uniform [0, 1) values per lattice cell, from integer arithmetic so they are bit-identical everywhere."""
    h = np.floor(cu).astype(np.int32).view(np.uint32) * np.uint32(73856093)
    h ^= np.floor(cv).astype(np.int32).view(np.uint32) * np.uint32(19349663)
    h ^= np.uint32(salt)
    for _ in range(2):
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x45D9F3B)
    h ^= h >> np.uint32(16)
    scale = np.float32(1.0 / 1024.0)
    return tuple((((h >> np.uint32(shift)) & np.uint32(1023)).astype(np.float32) * scale) for shift in (0, 10, 20))


class _Style:
    """A class's look turned into numbers, with name-seeded variation so that similar table rows still differ."""

    def __init__(self, name: str) -> None:
        look = _LOOKS[name]
        rng = np.random.default_rng(_stable_hash(name))
        self.look = look
        self.salt = int(rng.integers(0, 2**31))
        self.base, self.second, self.texture_colour = (_rgb(c) for c in (look.base, look.second, look.texture_colour))
        self.stem_colour = _rgb(_STEM_COLOURS.get(look.stem, "#000000"))
        self.aspect_u, self.aspect_v, self.taper, self.bend, self.notch = 1.0, 1.0, 0.0, 0.0, 0.0
        self.harmonics = [(k, float(rng.uniform(0.005, 0.02)), float(rng.uniform(0, 2 * np.pi))) for k in (2, 3)]
        shape = look.shape
        if shape == "round":
            self.aspect_u = float(rng.uniform(0.95, 1.08))
        elif shape == "oval":
            self.aspect_u = float(rng.uniform(1.2, 1.5))
        elif shape == "flat":
            self.aspect_v = float(rng.uniform(1.2, 1.4))
        elif shape in ("long", "banana"):
            self.aspect_v = float(rng.uniform(2.2, 3.0))
            self.bend = float(rng.uniform(0.3, 0.45)) if shape == "banana" else float(rng.uniform(0.0, 0.08))
        elif shape == "pear":
            self.aspect_u = float(rng.uniform(1.1, 1.35))
            self.taper = float(rng.uniform(0.3, 0.45))
        elif shape == "heart":
            self.taper, self.notch = float(rng.uniform(-0.3, -0.2)), float(rng.uniform(0.12, 0.2))
        elif shape == "cone":
            self.aspect_u, self.taper = float(rng.uniform(1.05, 1.2)), float(rng.uniform(-0.5, -0.35))
        elif shape == "irregular":
            self.aspect_u = float(rng.uniform(0.85, 1.2))
            self.harmonics = [(k, float(rng.uniform(0.03, 0.07)), float(rng.uniform(0, 2 * np.pi)))
                              for k in (2, 3, 4, 5)]
        elif shape == "lobed":
            self.aspect_u = float(rng.uniform(1.0, 1.2))
            lobes = int(rng.integers(3, 5))
            self.harmonics = [(lobes, float(rng.uniform(0.05, 0.08)), float(rng.uniform(0, 2 * np.pi)))]
        elif shape == "star":
            self.aspect_u = float(rng.uniform(1.2, 1.4))
            self.harmonics = [(5, 0.16, float(rng.uniform(0, 2 * np.pi)))]
        self.texture_frequency = float(rng.uniform(0.8, 1.25))
        self.texture_phase = float(rng.uniform(0, 2 * np.pi))
        self.blend_centre = float(rng.uniform(-0.3, 0.3))
        self.mottle_phases = (float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi)))
        self.ribs = int(rng.integers(4, 7))
        self.stem_length = _STEM_LENGTH[look.stem] * float(rng.uniform(0.85, 1.15))
        self.stem_width = float(rng.uniform(0.03, 0.045))
        self.leaves = int(rng.integers(5, 8))
        if shape in ("long", "banana"):
            end = self._boundary(np.pi)
            self.anchor = (-end + 0.04, self.bend * (end * end - 0.5))
            tilt = -1.6 * self.bend * end
            self.direction = (-1.0 / math.hypot(1.0, tilt), tilt / math.hypot(1.0, tilt))
        else:
            self.anchor = (0.0, -self._boundary(-np.pi / 2) / self.aspect_v + 0.05)
            self.direction = (0.0, -1.0)
        extent = max(1.0, math.hypot(*self.anchor) + self.stem_length)
        self.radius_px = 0.47 * SIZE * look.size / extent

    def _boundary(self, theta: float) -> float:
        radius = 1.0 + sum(a * math.cos(k * theta + p) for k, a, p in self.harmonics)
        return radius - self.notch * math.exp(-12.0 * math.cos(theta) ** 2) * max(0.0, -math.sin(theta))


@functools.cache
def _style(name: str) -> _Style:
    return _Style(name)


_GRID_Y, _GRID_X = (np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5 - SIZE / 2)


def _texture(style: _Style, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(how much of the texture colour, brightness multiplier) at each surface point."""
    kind = style.look.texture
    f = style.texture_frequency
    ones = np.ones_like(lon)
    if kind == "speckle":
        cu, cv = lon * 9.0 * f, lat * 9.0 * f
        present, cx, cy = _cell_hash(cu, cv, style.salt)
        dist = _length(cu - np.floor(cu) - (0.25 + 0.5 * cx), cv - np.floor(cv) - (0.25 + 0.5 * cy))
        return (present < 0.55) * (1.0 - _smoothstep(0.1, 0.2, dist)), ones
    if kind == "streaks":
        phase = 22.0 * f * lon + 2.0 * np.sin(5.0 * lon + style.texture_phase) + 1.5 * lat
        strength, width, _ = _cell_hash(phase / (2 * np.pi) + 0.5, np.zeros_like(phase), style.salt)
        wave = np.cos(phase)
        return strength * _smoothstep(0.9 - 0.5 * width, 1.0, wave) * _smoothstep(-1.0, 0.2, lat), ones
    if kind == "stripes":
        wave = np.cos(7.0 * f * lon + 0.6 * np.sin(4.0 * lat + style.texture_phase))
        return _smoothstep(0.1, 0.5, wave), ones
    if kind == "net":
        a = np.abs(np.sin(9.0 * f * lon + 1.5 * np.sin(6.0 * lat + style.texture_phase)))
        b = np.abs(np.sin(9.0 * f * lat + 1.3 * np.sin(5.0 * lon)))
        return 0.9 * (1.0 - _smoothstep(0.05, 0.3, np.minimum(a, b))), ones
    if kind == "scales":
        a = np.abs(np.sin(6.0 * f * (lon + 1.2 * lat)))
        b = np.abs(np.sin(6.0 * f * (lon - 1.2 * lat)))
        return 1.0 - _smoothstep(0.0, 0.35, np.minimum(a, b)), 0.85 + 0.2 * np.maximum(a, b)
    if kind == "bumps":
        bump = np.cos(14.0 * f * lon) * np.cos(14.0 * f * lat)
        return 0.35 * np.clip(-bump, 0.0, 1.0), 0.85 + 0.2 * bump
    if kind == "grain":
        value, _, _ = _cell_hash(lon * 30.0 * f, lat * 30.0 * f, style.salt)
        return 0.6 * value * value, ones
    if kind == "ribs":
        valley = (0.5 - 0.5 * np.cos(style.ribs * lon + style.texture_phase)) ** 3
        return 0.5 * valley, 1.0 - 0.35 * valley
    return np.zeros_like(lon), ones


def _blend(style: _Style, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """How much of the second colour: a blush on one side, a cap at the bottom, or blotches."""
    kind = style.look.blend
    if kind == "side":
        return _smoothstep(-0.3, 0.9, np.cos(lon - style.blend_centre))
    if kind == "cap":
        return _smoothstep(-0.5, 0.8, lat + style.blend_centre)
    if kind == "mottle":
        p, q = style.mottle_phases
        noise = np.sin(3.1 * lon + p + 2.0 * lat) + np.sin(5.3 * lat + q + 1.7 * lon)
        return _smoothstep(-0.6, 0.9, noise)
    return np.zeros_like(lon)


def _stem_cover(style: _Style, u: np.ndarray, v: np.ndarray, px: float) -> np.ndarray:
    """Coverage of the stem, calyx or leaf crown (the only kinds left), drawn in the object's rotated frame."""
    kind = style.look.stem
    du, dv = u - style.anchor[0], v - style.anchor[1]
    dx, dy = style.direction
    along = du * dx + dv * dy
    across = du * -dy + dv * dx
    length = style.stem_length
    if kind in ("stem", "gstem"):
        across = across - 0.25 * along * along
        ends = np.clip(np.minimum(along + 0.06, length - along) * px + 0.5, 0.0, 1.0)
        return ends * np.clip((style.stem_width * (1.0 - 0.3 * along / length) - np.abs(across)) * px + 0.5, 0.0, 1.0)
    if kind == "calyx":
        along = 2.5 * (along - 0.02)
        angle = np.arctan2(across, along)
        reach = 2.2 * length * (0.3 + 0.7 * np.abs(np.cos(0.5 * style.leaves * angle)) ** 4)
        return np.clip((reach - _length(along, across)) * px / 2.5 + 0.5, 0.0, 1.0)
    angle = np.arctan2(across, along)
    reach = length * np.clip(np.cos(angle * 1.1), 0.0, 1.0) * (0.4 + 0.6 * np.abs(np.cos(style.leaves * angle)) ** 6)
    return np.clip((reach - _length(along, across)) * px + 0.5, 0.0, 1.0)


def _render(name: str, rng: np.random.Generator, tilted: bool) -> np.ndarray:
    """One 100x100 RGB view of a class: the fruit spun on a turntable, tilted for the real set's r_ images."""
    style = _style(name)
    look = style.look
    px = style.radius_px * float(rng.uniform(0.95, 1.04))
    angle = float(rng.uniform(0, 2 * np.pi)) if tilted else float(rng.normal(0.0, 0.2))
    spin = float(rng.uniform(0, 2 * np.pi))
    ox, oy = (float(value) for value in rng.uniform(-2.0, 2.0, size=2))
    lx, ly, lz = float(rng.uniform(-0.7, -0.2)), float(rng.uniform(-0.8, -0.3)), 1.0
    gain = float(rng.uniform(0.92, 1.05))
    tint = rng.normal(1.0, 0.025, size=3).astype(np.float32)[:, None, None]

    c, s = math.cos(angle), math.sin(angle)
    x = (_GRID_X - ox) * (1.0 / px)
    y = (_GRID_Y - oy) * (1.0 / px)
    u = x * c + y * s
    v = y * c - x * s
    norm = math.sqrt(lx * lx + ly * ly + lz * lz)
    lu, lv, lz = (lx * c + ly * s) / norm, (ly * c - lx * s) / norm, lz / norm

    su = u * style.aspect_u
    sv = (v - style.bend * (u * u - 0.5)) * style.aspect_v
    if style.taper:
        su = su / np.maximum(0.2, 1.0 + style.taper * sv)
    rho = _length(su, sv) + 1e-6
    cos_t, sin_t = su / rho, sv / rho
    boundary = np.ones_like(rho)
    theta = np.arctan2(sv, su)
    for k, amplitude, phase in style.harmonics:
        boundary += amplitude * np.cos(k * theta + phase)
    if style.notch:
        boundary -= style.notch * np.exp(-12.0 * cos_t * cos_t) * np.maximum(0.0, -sin_t)
    cover = np.clip((boundary - rho) * px + 0.5, 0.0, 1.0)

    q = np.minimum(rho / boundary, 0.999)
    xn, yn = q * cos_t, q * sin_t
    zn = np.sqrt(1.0 - q * q)
    lon = np.arctan2(xn, zn) + spin
    amount, brightness = _texture(style, lon, yn)
    mix = _blend(style, lon, yn)
    colour = style.base + (style.second - style.base) * mix
    colour += (style.texture_colour - colour) * amount

    diffuse = np.maximum(0.0, xn * lu + yn * lv + zn * lz)
    hz = lz + 1.0
    hnorm = math.sqrt(lu * lu + lv * lv + hz * hz)
    facing = np.maximum(1e-6, (xn * lu + yn * lv + zn * hz) * (1.0 / hnorm))
    specular = (200.0 * look.gloss) * np.exp((10.0 + 50.0 * look.gloss) * np.log(facing))
    colour = colour * tint * ((0.45 + 0.6 * diffuse) * brightness * gain) + specular

    if look.stem != "none":
        stem = _stem_cover(style, u, v, px)
        stem_colour = style.stem_colour * ((0.7 + 0.4 * diffuse) * gain)
        colour += (stem_colour - colour) * stem
        cover = np.maximum(cover, stem)
    image = 255.0 + (colour - 255.0) * cover + 0.5
    return np.clip(image, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _file_name(k: int) -> str:
    """The k-th file of a class folder, named like the real set: 0_100.jpg, r_0_100.jpg, 1_100.jpg, ..."""
    return f"{'r_' if k % 2 else ''}{k // 2}_100.jpg"


def _image_rng(seed: int, split: str, name: str, k: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), _stable_hash(name), k]))


def _demo_jpeg(seed: int, split: str, name: str, k: int) -> bytes:
    pixels = _render(name, _image_rng(seed, split, name, k), tilted=bool(k % 2))
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=JPEG_QUALITY, colorspace="RGB")


def _write_atomically(path: str, data: bytes) -> None:
    """Write via a hidden temp file and rename, so readers never see a half-written image; unchanged files stay."""
    try:
        with open(path, "rb") as existing:
            if existing.read() == data:
                return
    except FileNotFoundError:
        pass
    folder, name = os.path.split(path)
    temp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


def _write_chunk(root: str, seed: int, split: str, name: str, start: int, stop: int) -> None:
    folder = os.path.join(root, split, name)
    for k in range(start, stop):
        _write_atomically(os.path.join(folder, _file_name(k)), _demo_jpeg(seed, split, name, k))


def _usable_cpus() -> int:
    """CPUs this process may run on, which in a container is often fewer than os.cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _pick_classes(count: int) -> list[str]:
    """The first `count` classes of a fixed order: a varied preferred set, then the rest in hash order."""
    rest = sorted((c for c in FRUITS_360_CLASSES if c not in _PREFERRED), key=_stable_hash)
    return sorted((list(_PREFERRED) + rest)[:count])


def _prepare_root(root: str, wanted: dict[str, dict[str, int]]) -> None:
    """Claim root with a marker file, then drop images and temp files that an earlier, different run left behind.

    A folder without the marker that already holds files is refused: it may be a real dataset.
    """
    marker = os.path.join(root, MARKER)
    if os.path.exists(root) and not os.path.isdir(root):
        raise FruitpipeError(f"{root} exists and is not a folder; choose an empty or new folder.")
    if os.path.isdir(root) and os.listdir(root) and not os.path.exists(marker):
        raise FruitpipeError(
            f"{root} is not empty and was not made by the demo generator; choose an empty or new folder."
        )
    os.makedirs(root, exist_ok=True)
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"generator": "fruitpipe.demo_data", "classes": wanted}, handle)
    for split in SPLITS:
        split_dir = os.path.join(root, split)
        existing = os.listdir(split_dir) if os.path.isdir(split_dir) else []
        for name in set(existing) & set(FRUITS_360_CLASSES):
            folder = os.path.join(split_dir, name)
            keep = {_file_name(k) for k in range(wanted[split].get(name, 0))}
            for entry in os.listdir(folder):
                stale = _FILE_NAME.fullmatch(entry) and entry not in keep
                if stale or (entry.startswith(".") and entry.endswith(".tmp")):
                    os.remove(os.path.join(folder, entry))
            if name not in wanted[split] and not os.listdir(folder):
                os.rmdir(folder)
        for name in wanted[split]:
            os.makedirs(os.path.join(split_dir, name), exist_ok=True)


def generate_demo_dataset(
    root: str,
    classes: int = 20,
    per_class: int = 30,
    seed: int = 0,
    test_per_class: int | None = None,
    workers: int | None = None,
) -> DemoDatasetSummary:
    """Write a Fruits-360-like dataset (root/Training/<class>/*.jpg, root/Test/<class>/*.jpg) and say what it wrote.

    The full real size is classes=131, per_class=517 (Test then defaults to 172 per class).
    """
    for label, value, low in (("classes", classes, 1), ("per_class", per_class, 1), ("seed", seed, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise FruitpipeError(f"{label} must be an integer of at least {low}, got {value!r}.")
    if classes > len(FRUITS_360_CLASSES):
        raise FruitpipeError(
            f"classes must be at most {len(FRUITS_360_CLASSES)} (the Fruits-360 classes), got {classes}."
        )
    if test_per_class is None:
        test_per_class = max(1, round(per_class / 3))
    if not isinstance(test_per_class, int) or isinstance(test_per_class, bool) or test_per_class < 1:
        raise FruitpipeError(f"test_per_class must be an integer of at least 1, got {test_per_class!r}.")
    workers = _usable_cpus() if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise FruitpipeError(f"workers must be an integer of at least 1, got {workers!r}.")

    started = time.perf_counter()
    names = _pick_classes(classes)
    counts = {"Training": per_class, "Test": test_per_class}
    _prepare_root(root, {split: {name: counts[split] for name in names} for split in SPLITS})
    chunks = [
        (root, seed, split, name, start, min(start + _CHUNK, counts[split]))
        for split in SPLITS
        for name in names
        for start in range(0, counts[split], _CHUNK)
    ]
    if workers == 1 or len(chunks) == 1:
        for chunk in chunks:
            _write_chunk(*chunk)
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
            for future in [pool.submit(_write_chunk, *chunk) for chunk in chunks]:
                future.result()
    return DemoDatasetSummary(
        root=root,
        classes=names,
        training_images=per_class * len(names),
        test_images=test_per_class * len(names),
        seconds=time.perf_counter() - started,
    )
