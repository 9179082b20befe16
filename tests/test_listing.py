"""Listing never drops a file silently, never opens a FIFO, follows folder symlinks without looping, and knows
when a file was rewritten in place; the inventory has a read timeout and refuses outputs it would mix with.

Real files in tmp_path: FIFOs made with os.mkfifo, real symlinks, real same-size rewrites.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fruitpipe import inventory, pipeline, storage
from fruitpipe.cli import main
from fruitpipe.config import build_config
from fruitpipe.dataset import list_split, split_and_class
from fruitpipe.errors import FruitpipeError
from fruitpipe.inventory import build_inventory
from fruitpipe.run_folder import RUN_MARKER
from tests.support.compare import listing_digest
from tests.support.images import bmp as _bmp


def _write(path: Path, data: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _hostile_source(root: Path, photos: list[bytes]) -> dict[str, str]:
    """A Training/Test source with every file a listing used to drop; returns {relative path: expected outcome}
    for the Training run ('ok', or the reason its `list` error row must contain)."""
    expected: dict[str, str] = {}
    photo = photos[0]

    def add(relative: str, outcome: str, data: bytes | None = None) -> None:
        _write(root / relative, data if data is not None else photos[len(expected) % len(photos)])
        expected[relative] = outcome

    for name in ("a.jpg", "b.jpg", "c.jpg"):
        add(f"Training/Apple/{name}", "ok")
    add("Training/Banana/a.jpg", "ok")
    add("Training/Banana/notes.txt", "not an image file")
    add("Training/.Cherry/a.jpg", "in a hidden folder (.Cherry)")
    add("Training/..Date/a.jpg", "in a hidden folder (..Date)")
    add("Training/Apple/.thumbs/a.jpg", "in a hidden folder (.thumbs)")
    add("Training/loose.jpg", "not in a class folder")
    add("Validation/Apple/a.jpg", "not in a split folder")
    add("top.jpg", "not in a split folder")
    add("README.txt", "not in a split folder")
    _write(root / "Test/Apple/a.jpg", photo)  # the other split: not this run's, not an error
    for hidden in HIDDEN:
        _write(root / hidden, b"x")
    os.mkfifo(root / "Training/Banana/fifo.jpg")
    expected["Training/Banana/fifo.jpg"] = "not a regular file (FIFO)"
    # A class folder that is a symlink to a folder elsewhere, and a link back up that would loop forever.
    _write(root.parent / "elsewhere" / "Fig" / "a.jpg", photos[-1])
    os.symlink(root.parent / "elsewhere" / "Fig", root / "Training" / "Fig")
    expected["Training/Fig/a.jpg"] = "ok"
    os.symlink(root / "Training", root / "Training" / "Apple" / "up")
    expected["Training/Apple/up"] = "folder symlink loop"
    os.symlink(root / "nowhere", root / "Training" / "Banana" / "gone.jpg")
    expected["Training/Banana/gone.jpg"] = "broken symbolic link"
    return expected


HIDDEN = {"Training/Apple/.DS_Store", "Training/.hidden.jpg", ".git/objects/ab/cdef", ".DS_Store"}


def test_find_files_reports_what_cannot_be_read_and_follows_folder_symlinks(tmp_path):
    root = tmp_path / "src"
    _hostile_source(root, [b"jpeg bytes"])
    found = storage.find_files(storage.locate(str(root)), str(root))
    relative = {path[len(str(root)) + 1:]: entry for path, entry in found.items()}
    assert relative["Training/Banana/fifo.jpg"].problem == "not a regular file (FIFO)"
    assert "loop" in relative["Training/Apple/up"].problem
    assert "broken symbolic link" in relative["Training/Banana/gone.jpg"].problem
    assert relative["Training/Fig/a.jpg"].problem == "" and relative["Training/Fig/a.jpg"].size == 10
    stat = os.stat(root / "Training/Apple/a.jpg")
    assert relative["Training/Apple/a.jpg"].version == str(stat.st_mtime_ns)
    assert not any(path.startswith("Training/Apple/up/") for path in relative)


def test_no_file_of_the_split_is_dropped_silently(tmp_path):
    root = tmp_path / "src"
    expected = _hostile_source(root, [b"jpeg bytes"])
    listing = list_split(str(root), "Training")
    outcomes = {record.path: "ok" for record in listing.images}
    outcomes.update({file.path: file.reason for file in listing.other_files})
    assert sorted(outcomes) == sorted(expected)
    for path, outcome in expected.items():
        assert outcome in outcomes[path], (path, outcomes[path])
    assert listing.hidden_files == len(HIDDEN)
    labels = {file.path: file.label for file in listing.other_files}
    assert labels["Training/.Cherry/a.jpg"] == ".Cherry" and labels["Training/loose.jpg"] == ""
    assert {record.label for record in listing.images} == {"Apple", "Banana", "Fig"}
    # Every file os.walk finds outside the other split is a row or a counted hidden file; the listing also
    # reaches what lies behind folder symlinks, which os.walk does not enter.
    walked = {str(Path(folder, name).relative_to(root)) for folder, _, names in os.walk(root) for name in names}
    walked = {path for path in walked if not path.startswith("Test/")}
    assert walked - set(expected) == HIDDEN
    assert set(expected) - walked == {"Training/Fig/a.jpg", "Training/Apple/up"}


def test_a_same_size_rewrite_changes_the_listing_digest(tmp_path):
    image = _write(tmp_path / "src" / "Training" / "Apple" / "a.bmp", _bmp(0))
    _write(tmp_path / "src" / "Training" / "Apple" / "b.bmp", _bmp(1))

    def digest() -> str:
        return listing_digest(str(tmp_path / "src"))
    before = digest()
    stat = image.stat()
    image.write_bytes(_bmp(2))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert image.stat().st_size == stat.st_size
    assert digest() != before


def test_predict_check_refuses_a_fifo_or_a_folder_at_once(tmp_path):
    fifo = tmp_path / "y.jpg"
    os.mkfifo(fifo)
    location = storage.locate(str(tmp_path))
    started = time.monotonic()
    with pytest.raises(FruitpipeError, match=r"y\.jpg is not a regular file \(FIFO\)"):
        storage.require_regular_file(location, str(fifo))
    with pytest.raises(FruitpipeError, match="is a folder, not an image file"):
        storage.require_regular_file(location, str(tmp_path))
    assert time.monotonic() - started < 1
    storage.require_regular_file(location, str(_write(tmp_path / "ok.jpg", b"x")))
    with pytest.raises(FileNotFoundError):
        storage.require_regular_file(location, str(tmp_path / "missing.jpg"))


def test_inventory_reports_a_fifo_without_opening_it(tmp_path):
    root = tmp_path / "src"
    _write(root / "Training/Apple/a.bmp", _bmp(0))
    _write(root / "Training/Apple/.DS_Store", b"x")
    os.mkfifo(root / "Training/Apple/y.jpg")
    started = time.monotonic()
    summary = build_inventory(str(root), str(tmp_path / "inv"), read_timeout_s=30)
    assert time.monotonic() - started < 10
    rows = pd.read_csv(summary.images_csv).set_index("path")
    assert rows.loc["Training/Apple/y.jpg", "reason"] == "not a regular file (FIFO)"
    assert not rows.loc["Training/Apple/y.jpg", "readable"] and rows.loc["Training/Apple/a.bmp", "readable"]
    assert (summary.files, summary.hidden_files) == (2, 1)


def _swap_for_fifo_after_listing(path: Path):
    """find_files as inventory calls it, then `path` replaced by a FIFO: the read that follows hangs."""
    real = storage.find_files

    def listing(location, root):
        found = real(location, root)
        path.unlink()
        os.mkfifo(path)
        return found
    return listing


def _release(fifo: Path) -> None:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_inventory_abandons_a_hung_read_after_its_timeout(tmp_path, monkeypatch):
    root = tmp_path / "src"
    _write(root / "Training/Apple/a.bmp", _bmp(0))
    hangs = _write(root / "Training/Apple/hangs.bmp", _bmp(1))
    monkeypatch.setattr(inventory, "find_files", _swap_for_fifo_after_listing(hangs))
    started = time.monotonic()
    try:
        summary = build_inventory(str(root), str(tmp_path / "inv"), read_timeout_s=1.0)
    finally:
        _release(hangs)
    assert time.monotonic() - started < 8
    rows = pd.read_csv(summary.images_csv).set_index("path")
    assert rows.loc["Training/Apple/hangs.bmp", "reason"] == "timed out after 1 s reading"
    assert rows.loc["Training/Apple/a.bmp", "readable"]


def test_inventory_stays_interruptible_while_a_read_hangs(tmp_path):
    root = tmp_path / "src"
    _write(root / "Training/Apple/a.bmp", _bmp(0))
    hangs = _write(root / "Training/Apple/hangs.bmp", _bmp(1))
    script = textwrap.dedent(f"""
        import os, sys
        from fruitpipe import cli, inventory, storage
        real = storage.find_files
        def listing(location, root):
            found = real(location, root)
            os.unlink({str(hangs)!r}); os.mkfifo({str(hangs)!r})
            print("listed", flush=True)
            return found
        inventory.find_files = listing
        sys.exit(cli.main(["inventory", {str(root)!r}, "--out", {str(tmp_path / "inv")!r}]))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "listed"
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
        _release(hangs)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["fruitpipe: interrupted; run the same command again to resume"]


@pytest.mark.parametrize("kind", ["file", "fruitpipe run folder"])
def test_inventory_refuses_an_output_it_would_mix_with(tmp_path, capsys, kind):
    _write(tmp_path / "src/Training/Apple/a.bmp", _bmp(0))
    out = tmp_path / "out"
    if kind == "file":
        _write(out, b"mine")
    else:
        _write(out / RUN_MARKER, b"{}")
    assert main(["inventory", str(tmp_path / "src"), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"is a {kind}" in error[0], error
    assert (out.read_bytes() == b"mine") if kind == "file" else sorted(os.listdir(out)) == [RUN_MARKER]


def test_a_decompression_bomb_is_a_reason_never_a_console_warning(tmp_path):
    """In a fresh process (as on the console), decoding bombs in threads prints nothing and gives the pixel count."""
    for side in (15_000, 25_000):  # over the limit (Pillow warns) and over twice it (Pillow raises)
        buffer = io.BytesIO()
        Image.new("1", (side, side)).save(buffer, "PNG")
        (tmp_path / f"{side}.png").write_bytes(buffer.getvalue())
    script = textwrap.dedent(f"""
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path
        from fruitpipe.images import ImageDecodeError, decode_rgb, image_size
        def reason(path):
            data = path.read_bytes()
            image_size(data)
            try:
                decode_rgb(data, target_size=96)
            except ImageDecodeError as exc:
                return str(exc)
        paths = sorted(Path({str(tmp_path)!r}).glob("*.png")) * 4
        with ThreadPoolExecutor(4) as pool:
            print(sorted(set(pool.map(reason, paths))))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.strip() == str(["image too large: 225000000 pixels (limit 200000000)",
                                       "image too large: 625000000 pixels (limit 200000000)"])


# --- runs (Spark) ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_run(demo_root, spark, cache_dir, tmp_path_factory):
    """One run over the hostile source, made of demo photos."""
    root = tmp_path_factory.mktemp("hostile") / "src"
    photos = [path.read_bytes() for path in sorted((demo_root / "Training").glob("*/*.jpg"))[::7]]
    expected = _hostile_source(root, photos)
    output = tmp_path_factory.mktemp("hostile-runs") / "out"
    config = build_config({}, {"source": str(root), "output": str(output), "image_size": 96, "pca_k": 2,
                               "read_timeout_s": 5.0, "cache_dir": cache_dir, "quiet": True})
    return pipeline.run(config), expected


@pytest.mark.spark
def test_a_run_gives_every_file_of_its_split_one_row(hostile_run):
    result, expected = hostile_run
    features, errors = result.features(), result.errors()
    assert sorted(features["path"]) == sorted(path for path, outcome in expected.items() if outcome == "ok")
    reasons = errors.set_index("path")
    for path, outcome in expected.items():
        if outcome != "ok":
            assert reasons.loc[path, "stage"] == "list" and outcome in reasons.loc[path, "reason"], path
    manifest = json.loads((Path(result.output) / "manifest.json").read_text())
    assert manifest["images_listed"] == len(expected) == manifest["images_ok"] + manifest["images_failed"]
    assert manifest["hidden_files_skipped"] == len(HIDDEN)
    assert set(features["label"]) == {"Apple", "Banana", "Fig"}


@pytest.mark.spark
def test_a_same_size_rewrite_is_never_resumed_with_stale_features(spark, cache_dir, tmp_path):
    source = tmp_path / "src"
    for index in range(4):
        _write(source / "Training" / ("Apple" if index < 2 else "Banana") / f"{index}.bmp", _bmp(index))
    output = tmp_path / "out"
    options = {"source": str(source), "output": str(output), "image_size": 96, "pca_k": 2, "cache_dir": cache_dir,
               "quiet": True}
    config = build_config({}, options)
    first = pipeline.run(config).features().set_index("path")
    rewritten = source / "Training" / "Apple" / "0.bmp"
    stat = rewritten.stat()
    rewritten.write_bytes(_bmp(99))
    os.utime(rewritten, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert rewritten.stat().st_size == stat.st_size
    grown = pipeline.run(config).features().set_index("path")  # the run grows: the rewritten file is extracted again
    fresh = pipeline.run(build_config({}, {**options, "output": str(tmp_path / "fresh")})).features().set_index("path")
    changed = "Training/Apple/0.bmp"
    assert np.abs(np.asarray(grown.loc[changed, "features"]) - np.asarray(first.loc[changed, "features"])).max() > 1e-3
    np.testing.assert_allclose(np.stack(grown.loc[sorted(fresh.index), "features"]),
                               np.stack(fresh.loc[sorted(fresh.index), "features"]), atol=1e-5)


@pytest.mark.parametrize("path, expected", [
    ("Training/Apple Red 1/r_1_100.jpg", ("Training", "Apple Red 1")),
    ("Test/Banana/1.jpg", ("Test", "Banana")),
    ("Banana/1.jpg", ("", "Banana")),
    ("Training/loose.jpg", ("Training", "")),
    ("loose.jpg", ("", "")),
    ("Training/Banana/nested/1.jpg", ("Training", "Banana")),
])
def test_one_function_reads_split_and_class_from_a_path(path, expected):
    """The listing and the inventory read `<split>/<class>/...` through split_and_class alone."""
    assert split_and_class(path) == expected
