"""Every bad image ends as exactly one row, features or error, with the right stage; none stops or hangs a run.

One pipeline run covers a folder holding every bad case next to a few good images; the tests below read its
outputs. The hang cases (a file swapped for a FIFO after listing; a blocked loader in-process) prove the read
timeout; a FIFO already there when the source is listed is never opened.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from fruitpipe import pipeline
from fruitpipe.config import build_config
from fruitpipe.extract import RETRY_PAUSE_S, ExtractionSettings
from fruitpipe.images import decode_rgb
from fruitpipe.prefetch import HungReadsError, Job, Loaded, prefetched

pytestmark = pytest.mark.spark

READ_TIMEOUT_S = 3.0
SHARD_SIZE = 8
ODD = "Odd"
BROKEN = "Broken"  # sorts first: exactly shard 0, in which no image can be processed
UNICODE_CLASS = "Äpfel \"rot\" & 'grün' ü"
AS_ROOT = os.geteuid() == 0

# name -> (status or error stage, what the reason or format must contain)
EXPECTED = {
    "truncated.jpg": ("decode", "truncated"),
    "empty.jpg": ("decode", "empty file"),
    "text.jpg": ("decode", "not an image"),
    "png_named.jpg": ("ok", "PNG"),
    "gray.jpg": ("ok", "JPEG"),
    "cmyk.jpg": ("ok", "JPEG"),
    "gray8.png": ("ok", "PNG"),
    "gray16.png": ("ok", "PNG"),
    "huge.jpg": ("ok", "JPEG"),
    "tiny.jpg": ("decode", "too small"),
    "bomb.png": ("decode", "too large"),
    "rotated.jpg": ("ok", "JPEG"),
    "unrotated.jpg": ("ok", "JPEG"),
    "rotated_reference.png": ("ok", "PNG"),
    "fifo.jpg": ("list", "not a regular file (FIFO)"),
    "hangs.jpg": ("read", f"timed out after {READ_TIMEOUT_S:g} s reading"),
    "vanishes.jpg": ("read", "vanished"),
    "notes.txt": ("list", "not an image file"),
}
if not AS_ROOT:
    EXPECTED["unreadable.jpg"] = ("read", "permission denied")


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _write_bad_cases(folder: Path, good: bytes) -> None:
    """The bad and odd files, all derived from one good demo photo."""
    photo = Image.open(io.BytesIO(good)).convert("RGB")
    folder.mkdir(parents=True)
    files = {
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "text.jpg": b"these are notes, not a photo\n",
        "png_named.jpg": _encode(photo, "PNG"),
        "gray.jpg": _encode(photo.convert("L"), "JPEG", quality=95),
        "cmyk.jpg": _encode(photo.convert("CMYK"), "JPEG", quality=95),
        "tiny.jpg": _encode(photo.resize((5, 5)), "JPEG"),
        "bomb.png": _encode(Image.new("1", (15_000, 15_000)), "PNG"),
        "notes.txt": b"not an image\n",
    }
    # A dark 16-bit PNG and the same pixels at 8 bits: 65535 maps to 255, the image's own peak does not matter.
    dark = (np.asarray(photo.convert("L"), dtype=np.uint16) * 3) // 4
    files["gray8.png"] = _encode(Image.fromarray(dark.astype(np.uint8)), "PNG")
    files["gray16.png"] = _encode(Image.fromarray(dark * 257), "PNG")
    # A non-square JPEG tagged "rotate 90 clockwise to display", the same bytes untagged, and the displayed
    # (physically rotated) pixels as a lossless PNG, decoded the way the pipeline decodes JPEGs.
    wide = photo.crop((0, 20, 100, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    files["rotated.jpg"] = _encode(wide, "JPEG", quality=95, exif=exif.tobytes())
    files["unrotated.jpg"] = _encode(wide, "JPEG", quality=95)
    stored, _ = decode_rgb(files["unrotated.jpg"])
    files["rotated_reference.png"] = _encode(Image.fromarray(np.rot90(np.asarray(stored), k=-1)), "PNG")
    huge = Image.new("RGB", (10_000, 10_000), (200, 40, 30))
    ImageDraw.Draw(huge).ellipse((1500, 1500, 8500, 8500), fill=(240, 200, 20))
    files["huge.jpg"] = _encode(huge, "JPEG", quality=80)
    files["vanishes.jpg"] = good
    files["hangs.jpg"] = good
    if not AS_ROOT:
        files["unreadable.jpg"] = good
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if not AS_ROOT:
        (folder / "unreadable.jpg").chmod(0)
    os.mkfifo(folder / "fifo.jpg")


def _release_fifo(path: Path) -> None:
    """Give a reader still blocked on the FIFO its end of file, so no thread stays stuck after the test."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


@pytest.fixture(scope="module")
def bad_run(demo_root, spark, cache_dir, tmp_path_factory):
    """One run over Training/{Broken, Good, Odd, <unicode class>}: a shard of broken files, 6 good photos, every
    bad case and a notes file."""
    source = tmp_path_factory.mktemp("bad-source")
    training = source / "Training"
    photos = sorted((demo_root / "Training").glob("*/*.jpg"))[:6]
    (training / "Good").mkdir(parents=True)
    for photo in photos[:4]:
        shutil.copy(photo, training / "Good" / photo.name)
    (training / UNICODE_CLASS).mkdir()
    for photo in photos[4:6]:
        shutil.copy(photo, training / UNICODE_CLASS / f"foto {photo.name}")
    _write_bad_cases(training / ODD, photos[0].read_bytes())
    (training / BROKEN).mkdir()
    for number in range(SHARD_SIZE):
        (training / BROKEN / f"broken-{number}.jpg").write_bytes(photos[0].read_bytes()[: 200 + number])

    real_plan_run = pipeline.plan_run

    def list_then_delete(*args, **kwargs):
        planned = real_plan_run(*args, **kwargs)
        (training / ODD / "vanishes.jpg").unlink()
        (training / ODD / "hangs.jpg").unlink()
        os.mkfifo(training / ODD / "hangs.jpg")
        return planned

    output = tmp_path_factory.mktemp("bad-runs") / "out"
    config = build_config({}, {"source": str(source), "output": str(output), "image_size": 96, "pca_k": 3,
                               "shard_size": SHARD_SIZE, "batch_size": 4, "read_timeout_s": READ_TIMEOUT_S,
                               "cache_dir": cache_dir, "quiet": True, "features_csv": True})
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pipeline, "plan_run", list_then_delete)
            result = pipeline.run(config)
    finally:
        _release_fifo(training / ODD / "hangs.jpg")
        if not AS_ROOT:
            (training / ODD / "unreadable.jpg").chmod(0o644)
    return result


def _by_name(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(name=frame["path"].str.rsplit("/", n=1).str[-1]).set_index("name")


def _vector(frame: pd.DataFrame, name: str) -> np.ndarray:
    return np.asarray(frame.loc[name, "features"], dtype=np.float64)


def test_every_listed_file_ends_in_exactly_one_row(bad_run):
    manifest = json.loads((Path(bad_run.output) / "manifest.json").read_text())
    features, errors, metadata = bad_run.features(), bad_run.errors(), bad_run.metadata()
    listed = SHARD_SIZE + 4 + 2 + len(EXPECTED)
    assert manifest["images_listed"] == listed == (manifest["images_ok"] + manifest["images_failed"]
                                                   + manifest["images_retryable"])
    assert len(features) == manifest["images_ok"]
    assert len(errors) == manifest["images_failed"] + manifest["images_retryable"]
    assert manifest["images_retryable"] == errors["retryable"].sum() == 1  # hangs.jpg: a timeout is no verdict
    assert set(features["path"]).isdisjoint(errors["path"])
    assert len(set(features["path"]) | set(errors["path"])) == listed
    assert len(metadata) == listed - 2  # notes.txt and fifo.jpg are refused at listing, before any metadata
    assert (metadata["status"] == "ok").sum() == len(features)


def test_each_bad_case_has_its_outcome_stage_and_reason(bad_run):
    features, errors = _by_name(bad_run.features()), _by_name(bad_run.errors())
    metadata = _by_name(bad_run.metadata())
    for name, (outcome, detail) in EXPECTED.items():
        if outcome == "ok":
            assert name in features.index, f"{name} should have been processed: {errors.reason.get(name)}"
            assert metadata.loc[name, "status"] == "ok" and metadata.loc[name, "format"] == detail, name
        else:
            assert name in errors.index and name not in features.index, name
            assert errors.loc[name, "stage"] == outcome, (name, errors.loc[name, "reason"])
            assert detail in errors.loc[name, "reason"], (name, errors.loc[name, "reason"])
            timed_out = detail.startswith("timed out")
            assert errors.loc[name, "retryable"] == timed_out, name
            if outcome != "list":
                assert metadata.loc[name, "status"] == ("retryable" if timed_out else "failed"), name
    assert (metadata.loc["huge.jpg", "width"], metadata.loc["huge.jpg", "height"]) == (10_000, 10_000)


def test_a_shard_in_which_every_image_fails_is_written_and_done(bad_run):
    out = Path(bad_run.output)
    stats = json.loads((out / "_shards" / "part-00000.json").read_text())
    assert (stats["images"], stats["ok"], stats["failed"]) == (SHARD_SIZE, 0, SHARD_SIZE)
    assert len(pd.read_parquet(out / "features" / "part-00000.parquet")) == 0
    broken = bad_run.errors().query("label == @BROKEN")
    assert len(broken) == SHARD_SIZE and set(broken["stage"]) == {"decode"}


def test_a_read_hanging_on_every_attempt_ends_the_shard_within_its_attempts(bad_run):
    shard_id = _shard_of(bad_run, f"Training/{ODD}/hangs.jpg")
    stats = json.loads((Path(bad_run.output) / "_shards" / f"part-{shard_id:05d}.json").read_text())
    attempts = ExtractionSettings.read_attempts
    pauses = sum(RETRY_PAUSE_S * 2 ** n for n in range(attempts - 1))
    least = attempts * READ_TIMEOUT_S + pauses
    assert least <= stats["seconds"]["wall"] < least + 20
    assert stats["retryable"] == 1


def _shard_of(run, path: str) -> int:
    shards = Path(run.output) / "_shards"
    for stats_file in sorted(shards.glob("part-*.json")):
        part = Path(run.output) / "metadata" / f"{stats_file.stem}.parquet"
        if path in set(pd.read_parquet(part)["path"]):
            return json.loads(stats_file.read_text())["shard_id"]
    raise AssertionError(f"{path} is in no shard")


def test_exif_orientation_is_applied(bad_run):
    features = _by_name(bad_run.features())
    rotated, reference = _vector(features, "rotated.jpg"), _vector(features, "rotated_reference.png")
    unrotated = _vector(features, "unrotated.jpg")
    assert np.abs(rotated - reference).max() < 1e-4
    assert np.abs(rotated - unrotated).max() > 100 * max(np.abs(rotated - reference).max(), 1e-6)


def test_sixteen_bit_png_scales_like_its_eight_bit_twin(bad_run):
    features = _by_name(bad_run.features())
    np.testing.assert_allclose(_vector(features, "gray16.png"), _vector(features, "gray8.png"), atol=1e-5)


def test_cmyk_jpeg_decodes_to_the_right_colours(demo_root):
    photo = Image.open(sorted((demo_root / "Training").glob("*/*.jpg"))[0]).convert("RGB")
    decoded, _ = decode_rgb(_encode(photo.convert("CMYK"), "JPEG", quality=95))
    difference = np.abs(np.asarray(decoded, dtype=np.int16) - np.asarray(photo, dtype=np.int16)).mean()
    assert difference < 6


def test_unicode_spaces_and_quotes_in_class_names_survive(bad_run):
    features, metadata = bad_run.features(), bad_run.metadata()
    assert (features["label"] == UNICODE_CLASS).sum() == 2
    assert (metadata["label"] == UNICODE_CLASS).sum() == 2
    csv = pd.read_csv(Path(bad_run.output) / "csv" / "metadata.csv")
    assert (csv["label"] == UNICODE_CLASS).sum() == 2
    assert (csv["path"].str.startswith(f"Training/{UNICODE_CLASS}/foto ")).sum() == 2


@pytest.mark.skipif(AS_ROOT, reason="root reads a chmod 000 file anyway, so there is no unreadable file to test")
def test_an_unreadable_file_is_a_read_error(bad_run):
    errors = _by_name(bad_run.errors())
    assert errors.loc["unreadable.jpg", "stage"] == "read"
    assert "permission denied" in errors.loc["unreadable.jpg", "reason"]


def _loader(blocked: set[str], release: threading.Event):
    def load(job: Job) -> Loaded:
        if job.record["path"] in blocked:
            job.stage = "decode"
            release.wait()
        return Loaded(width=1)
    return load


def test_a_hung_load_is_abandoned_after_the_timeout_and_the_rest_keep_their_order():
    records = [{"path": f"{i}.jpg"} for i in range(12)]
    release = threading.Event()
    started = time.monotonic()
    try:
        results = list(prefetched(records, _loader({"3.jpg", "7.jpg"}, release), threads=2, window=4,
                                  timeout_s=0.5))
    finally:
        release.set()
    elapsed = time.monotonic() - started
    assert [record["path"] for record, _ in results] == [record["path"] for record in records]
    failed = {record["path"]: loaded for record, loaded in results if loaded.stage}
    assert set(failed) == {"3.jpg", "7.jpg"}
    assert all(loaded.stage == "decode" and "timed out after 0.5 s decoding" in loaded.reason
               for loaded in failed.values())
    assert 0.5 <= elapsed < 3.0


def test_many_hung_loads_fail_the_shard_so_spark_retries_it():
    records = [{"path": f"{i}.jpg"} for i in range(6)]
    release = threading.Event()
    try:
        with pytest.raises(HungReadsError, match="3 images hung longer than 0.2 s"):
            list(prefetched(records, _loader({r["path"] for r in records}, release), threads=2, window=6,
                            timeout_s=0.2, max_hung=2))
    finally:
        release.set()
