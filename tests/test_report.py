"""The HTML report of a real run (with failed images and an evaluation), opened in headless Chromium: its figures,
its photos (class strips, the PCA map's hover, the evaluation's mistakes) and its size for a FULL-size run."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import fruitpipe
from fruitpipe.cli import main
from fruitpipe.report import load_documents, photos, render
from fruitpipe.report import thumbnails as thumbnails_module
from fruitpipe.report.thumbnails import (
    PLACEHOLDER,
    THUMBNAIL_PX,
    Photo,
    read_thumbnails,
    thumbnail,
)
from fruitpipe.run_folder import Duplicates
from fruitpipe.storage import StorageUnavailable
from tests.support.moto_server import MotoServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FIGURES = 3
EMBEDDED_PHOTO = re.compile(r"\.(p\d+)\{background-image:url\(data:image/webp;base64,([A-Za-z0-9+/=]+)\)\}")
# A FULL run: Fruits-360's Training split.
FULL_IMAGES, FULL_CLASSES = 67_692, 131
PAGE_LIMIT_BYTES = 10_000_000
# The reported run: 3 classes x 12 demo photos, one corrupt, and a re-encoded copy.
IMAGES_WITH_FEATURES = 36
# Written into a copy of the page: after load, record whether every <img> decoded.
IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.images = String(images.length);
  document.body.dataset.imagesOk = String(images.every(i => i.complete && i.naturalWidth > 0));
});
</script>"""


def _chromium(profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).exists(), "chromium is missing: run `bash scripts/ensure-system-deps.sh`"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


# Written into a copy of the page: after load, hover the map's last point, record what the tip shows, then leave.
HOVER_CHECK = """<script>
window.addEventListener("load", () => {
  const points = document.querySelectorAll("#pca-map circle");
  const point = points[points.length - 1];
  const tip = document.getElementById("map-tip");
  const seen = document.body.dataset;
  seen.points = String(points.length);
  seen.hiddenBefore = String(tip.hidden);
  point.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
  seen.hidden = String(tip.hidden);
  seen.label = tip.querySelector(".tip-label").textContent;
  seen.path = tip.querySelector(".tip-path").textContent;
  seen.pointLabel = point.getAttribute("data-label");
  seen.pointPath = point.getAttribute("data-path");
  seen.photo = tip.querySelector(".ph").className;
  seen.background = getComputedStyle(tip.querySelector(".ph")).backgroundImage.slice(0, 40);
  document.getElementById("pca-map").dispatchEvent(new MouseEvent("mouseleave"));
  seen.hiddenAfter = String(tip.hidden);
});
</script>"""


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _probe(page: Path, workdir: Path, script: str) -> tuple[dict[str, str], list[str]]:
    """Open a copy of `page` with `script` added; return the body's data attributes and console lines."""
    probe = workdir / f"probe-{page.stem}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", script + "</body>"), encoding="utf-8")
    done = _chromium(workdir / "profile-dom", "--dump-dom", probe.as_uri())
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stdout[:500]
    attributes = {name: html.unescape(value) for name, value in re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))}
    return attributes, _console_lines(done.stderr)


def _image_check(page: Path, workdir: Path) -> tuple[dict[str, str], list[str]]:
    return _probe(page, workdir, IMAGE_CHECK)


def _embedded_photos(text: str) -> dict[str, bytes]:
    """The page's photos: CSS class -> WebP bytes."""
    return {name: base64.b64decode(data) for name, data in EMBEDDED_PHOTO.findall(text)}


def _reencode(original: Path, copy: Path) -> None:
    with Image.open(original) as image:
        image.save(copy, quality=85)


@pytest.fixture(scope="module")
def reported_run(demo_root, spark, cache_dir, tmp_path_factory) -> Path:
    """A run over three demo classes plus one corrupt JPEG, one stray text file, a re-encoded copy of a photo filed
    under another class and a test photo re-encoded from a training one, evaluated, then reported."""
    source = tmp_path_factory.mktemp("report-source")
    labels = sorted(p.name for p in (demo_root / "Training").iterdir())[:3]
    for split in ("Training", "Test"):
        for label in labels:
            shutil.copytree(demo_root / split / label, source / split / label)
    photos_of = [sorted((source / "Training" / label).glob("*.jpg")) for label in labels]
    photos_of[0][0].write_bytes(b"\xff\xd8 truncated")
    (source / "Training" / labels[1] / "notes.txt").write_text("not an image")
    _reencode(photos_of[0][1], source / "Training" / labels[2] / "copy.jpg")
    _reencode(photos_of[1][1], source / "Test" / labels[1] / "leaked.jpg")
    run_dir = tmp_path_factory.mktemp("report-runs") / "run"
    fruitpipe.run(source=str(source), output=str(run_dir), pca_k=5, shard_size=16, cache_dir=cache_dir, quiet=True)
    fruitpipe.evaluate_run(str(run_dir), str(source), quiet=True)
    return run_dir


@pytest.mark.spark
def test_report_renders_in_headless_chromium_with_every_figure(reported_run, tmp_path, capsys):
    assert main(["report", str(reported_run)]) == 0
    page = reported_run / "report" / "index.html"
    assert capsys.readouterr().out.strip() == f"wrote {page}"
    text = page.read_text(encoding="utf-8")
    assert text.count('src="data:image/png;base64,') == FIGURES
    assert not re.search(r"(src|href)=\"(https?:)?//", text)
    for expected in ("notes.txt", "not an image file", "decode", "PCA-5", "raw 1280-d", "efficientnet_lite0",
                     "pca_k: 5", "onnxruntime", "2 images failed"):
        assert expected in text, expected

    attributes, console = _image_check(page, tmp_path)
    assert attributes == {"images": str(FIGURES), "images-ok": "true"}
    assert console == []

    # Every image with features is a map point, 3 strips of 8; each photo (with the mistakes') embedded once.
    embedded = _embedded_photos(text)
    documents = load_documents(str(reported_run))
    mistakes = set(photos.confusion_photos(documents.evaluation, documents.manifest["source"]))
    mapped = {Photo(documents.manifest["source"], path) for path in documents.pca.column("path").to_pylist()}
    assert text.count("<circle ") == IMAGES_WITH_FEATURES and len(embedded) == len(mapped | mistakes)
    assert text.count('<div class="strip">') == 3 and text.count('role="img" title=') == 3 * 8
    assert PLACEHOLDER not in re.findall(r'class="ph ([a-z0-9]+)"', text)
    for data in embedded.values():
        with Image.open(io.BytesIO(data)) as photo:
            assert photo.format == "WEBP" and max(photo.size) == THUMBNAIL_PX
    assert "Misclassified test photos" in text
    assert 'id="duplicates"' not in text, "no duplicates section before `fruitpipe duplicates` ran"

    screenshot = tmp_path / "report.png"
    shot = _chromium(tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1280,4000",
                     page.as_uri())
    assert _console_lines(shot.stderr) == []
    with Image.open(screenshot) as image:
        assert image.size == (1280, 4000)
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = np.unique(pixels[::7], axis=0)
    assert len(colours) > 500, "the screenshot looks blank: figures did not render"
    assert (pixels.min(axis=1) < 200).mean() > 0.05


@pytest.mark.spark
def test_hovering_a_map_point_shows_its_photo_label_and_path(reported_run, tmp_path):
    page = Path(fruitpipe.write_report(str(reported_run)))
    seen, console = _probe(page, tmp_path, HOVER_CHECK)
    assert console == []
    assert seen["points"] == str(IMAGES_WITH_FEATURES)
    assert (seen["hidden-before"], seen["hidden"], seen["hidden-after"]) == ("true", "false", "true")
    assert (seen["label"], seen["path"]) == (seen["point-label"], seen["point-path"])
    run = fruitpipe.load_run(str(reported_run))
    assert dict(zip(run.pca()["path"], run.pca()["label"]))[seen["path"]] == seen["label"]
    name = seen["photo"].removeprefix("ph ")
    assert seen["background"].startswith('url("data:image/webp;base64,')
    source = Path(load_documents(str(reported_run)).manifest["source"])
    assert _embedded_photos(page.read_text(encoding="utf-8"))[name] == thumbnail((source / seen["path"]).read_bytes())


@pytest.mark.spark
def test_near_duplicates_and_leaked_test_images_show_as_photos(reported_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reported_run, run_dir)
    assert main(["duplicates", str(run_dir), "--test", str(run_dir / "evaluation" / "test_run")]) == 0
    assert "1 near-duplicate groups" in capsys.readouterr().out
    text = Path(fruitpipe.write_report(str(run_dir))).read_text(encoding="utf-8")
    assert '<a href="#duplicates">' in text
    section = text[text.index('<section id="duplicates">'):]
    section = section[:section.index("</section>")]
    source = Path(load_documents(str(run_dir)).manifest["source"])
    shown = re.findall(r'class="ph ([a-z0-9]+)" role="img" title="([^"]+)"', section)
    labels = sorted(p.name for p in (source / "Training").iterdir())
    original = sorted((source / "Training" / labels[0]).glob("*.jpg"))[1].relative_to(source).as_posix()
    leaked_from = sorted((source / "Training" / labels[1]).glob("*.jpg"))[1].relative_to(source).as_posix()
    # One group (the photo and its copy filed under another class), then the leaked test photo beside its original.
    assert [html.unescape(path) for _, path in shown] == sorted([original, f"Training/{labels[2]}/copy.jpg"]) + [
        f"Test/{labels[1]}/leaked.jpg", leaked_from]
    embedded = _embedded_photos(text)
    for name, path in shown:
        assert embedded[name] == thumbnail((source / html.unescape(path)).read_bytes()), path
    assert "<b>1</b> of them hold more than one label" in section and f"{labels[0]} / {labels[2]}" in section
    assert "1 of 13 test images" in section


def test_a_missing_or_unreadable_photo_shows_the_placeholder(demo_root, tmp_path):
    real = sorted((demo_root / "Training").glob("*/*.jpg"))[0].relative_to(demo_root).as_posix()
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    shown, gone, broken = (Photo(str(demo_root), real), Photo(str(tmp_path), "gone.jpg"),
                           Photo(str(tmp_path), "broken.jpg"))
    thumbnails = read_thumbnails([shown, gone, broken, shown])
    assert len(thumbnails) == 3 and thumbnails.missing == 2
    assert thumbnails.css_class(shown) != PLACEHOLDER
    assert thumbnails.css_class(gone) == thumbnails.css_class(broken) == PLACEHOLDER
    expected = thumbnail((demo_root / real).read_bytes())
    assert _embedded_photos(thumbnails.style()) == {thumbnails.css_class(shown): expected}
    evaluation = {"test_source": str(tmp_path), "misclassified_pca_1nn": [
        {"path": "gone.jpg", "label": "Kiwi", "predicted": "Pear",
         "neighbours": [{"path": real, "label": "Pear", "similarity": 0.91},
                        {"path": "Training/Kiwi/gone.jpg", "label": "Kiwi", "similarity": 0.87}]}]}
    section = photos.confusions_html(evaluation, str(demo_root), read_thumbnails(
        photos.confusion_photos(evaluation, str(demo_root))))
    assert re.findall(r'class="ph ([a-z0-9]+)"', section) == [PLACEHOLDER, "p0", PLACEHOLDER]
    assert "Kiwi → Pear" in section and "Pear 0.910" in section and "Kiwi 0.870" in section
    assert section.index('class="thumb same"') > section.index('class="thumb other"')


def _full_size_paths() -> tuple[list[str], list[str]]:
    """Labels and paths of a FULL run's training images: 131 classes, 67,692 images."""
    sizes = np.full(FULL_CLASSES, FULL_IMAGES // FULL_CLASSES)
    sizes[:FULL_IMAGES % FULL_CLASSES] += 1
    pairs = [(f"Class {number:03d}", f"Training/Class {number:03d}/{image}_100.jpg")
             for number, size in enumerate(sizes) for image in range(size)]
    return [label for label, _ in pairs], [path for _, path in pairs]


def _link_noise_photos(root: Path, wanted: set[Photo]) -> None:
    """Each wanted photo a link to one of 64 noise JPEGs (noise is the worst case for a thumbnail's size); the page
    then shows a placeholder for any photo it reads beyond those."""
    rng = np.random.default_rng(0)
    pool = root / "pool"
    pool.mkdir(parents=True)
    for number in range(64):
        Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(pool / f"{number}.jpg", quality=90)
    for number, photo in enumerate(sorted(wanted)):
        (root / photo.path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(pool / f"{number % 64}.jpg", root / photo.path)


@pytest.mark.spark
def test_a_full_size_run_makes_a_page_under_10_mb(reported_run, tmp_path):
    source = tmp_path / "full"
    labels, paths = _full_size_paths()
    real = load_documents(str(reported_run))
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(len(paths), 5)).astype(np.float32)
    pca = pa.table({"path": paths, "label": labels,
                    "pca": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 5)})
    classes = sorted(set(labels))
    mistakes = [{"path": f"Test/{classes[n]}/{n % 8}_100.jpg", "label": classes[n], "predicted": classes[n + 1],
                 "neighbours": [{"path": f"Training/{classes[n + 1]}/{n + 11 * k + 1}_100.jpg",
                                 "label": classes[n + 1], "similarity": 0.9} for k in range(5)]}
                for n in range(30)]
    evaluation = {**real.evaluation, "test_source": str(source), "misclassified_pca_1nn": mistakes,
                  "per_class": [{**real.evaluation["per_class"][0], "label": label} for label in classes]}
    # 40 groups of 10 photos and 100 leaks: more than the page shows of either.
    members = [(group, f"Training/{classes[group]}/{200 + image}_100.jpg")
               for group in range(40) for image in range(10)]
    leaks = [(f"Test/{classes[n]}/{n % 8}_100.jpg", f"Training/{classes[n]}/{300 + n}_100.jpg") for n in range(100)]
    found = Duplicates(
        pa.table({"group_id": [g for g, _ in members], "path": [p for _, p in members],
                  "label": [p.split("/")[1] for _, p in members], "distance": [0.0005] * len(members)}),
        pa.table({"test_path": [t for t, _ in leaks], "test_label": [t.split("/")[1] for t, _ in leaks],
                  "train_path": [t for _, t in leaks], "train_label": [t.split("/")[1] for _, t in leaks],
                  "distance": [0.0003] * len(leaks)}),
        {"groups": 40, "images_in_groups": 400, "images": len(paths), "largest_group": 10, "cross_label_groups": 0,
         "threshold": 0.0012, "measure": "pixel fingerprint", "test_run": str(tmp_path / "test-run"),
         "test_images": 8 * FULL_CLASSES, "leaked_test_images": 100,
         "leaked_per_class": {label: 1 for label in classes[:100]},
         "nn_distance_histogram": [{"from": 0.0, "to": 0.0012, "images": 400}]})
    duplicates = photos.DuplicateFindings(found, str(source), str(source))
    documents = dataclasses.replace(
        real, manifest={**real.manifest, "source": str(source)}, pca=pca, evaluation=evaluation,
        metadata=pa.table({"label": labels, "status": ["ok"] * len(labels)}), duplicates=duplicates)

    shown = photos.sample_run(str(source), labels, paths, vectors)
    expected = set(shown.photos()) | set(photos.confusion_photos(evaluation, str(source))) | set(duplicates.photos())
    assert len(duplicates.photos()) == photos.GROUPS_SHOWN * photos.GROUP_PHOTOS + 2 * photos.LEAKS_SHOWN
    _link_noise_photos(source, expected)

    page = render(documents, str(reported_run)).encode("utf-8")

    assert len(_embedded_photos(page.decode())) == len(expected) > photos.MAP_POINTS
    assert page.count(b"<circle ") == len(shown.paths) < photos.MAP_POINTS + FULL_CLASSES
    assert PLACEHOLDER.encode() not in set(re.findall(rb'class="ph ([a-z0-9]+)"', page))
    assert len(page) < PAGE_LIMIT_BYTES, f"{len(page):,} bytes"


def test_a_store_that_stays_unreachable_is_not_asked_again(demo_root, monkeypatch):
    asked = []

    def unreachable(location, path):
        asked.append(path)
        raise StorageUnavailable("storage unavailable: retries spent")

    monkeypatch.setattr(thumbnails_module, "read_bytes", unreachable)
    wanted = [Photo(str(demo_root), f"Training/x/{number}.jpg") for number in range(5)]
    found = read_thumbnails(wanted, threads=1)
    assert len(asked) == 1 and found.missing == 5


def test_the_image_check_notices_broken_images_and_console_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="missing.png"><script>console.error("broken page")</script></body></html>')
    attributes, console = _image_check(page, tmp_path)
    assert attributes == {"images": "1", "images-ok": "false"}
    assert len(console) == 1 and "broken page" in console[0]


@pytest.mark.s3
@pytest.mark.spark
def test_report_of_a_run_folder_on_s3(reported_run, monkeypatch):
    """The run folder and its source photos in S3: the page reads both there."""
    source = Path(load_documents(str(reported_run)).manifest["source"])
    with MotoServer() as moto:
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        for name, value in moto.env().items():
            monkeypatch.setenv(name, value)
        s3 = moto.client("s3")
        s3.create_bucket(Bucket="runs", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        for path in reported_run.rglob("*"):
            relative = path.relative_to(reported_run).as_posix()
            if path.is_file() and relative != "manifest.json" and not relative.startswith(("report/",
                                                                                          "evaluation/test_run/")):
                s3.upload_file(str(path), "runs", f"demo/{relative}")
        for path in (source / "Training").rglob("*.jpg"):
            s3.upload_file(str(path), "runs", f"photos/{path.relative_to(source).as_posix()}")
        manifest = {**load_documents(str(reported_run)).manifest, "source": "s3://runs/photos"}
        s3.put_object(Bucket="runs", Key="demo/manifest.json", Body=json.dumps(manifest).encode())
        assert fruitpipe.write_report("s3://runs/demo/") == "s3://runs/demo/report/index.html"
        remote = s3.get_object(Bucket="runs", Key="demo/report/index.html")["Body"].read().decode()
    assert remote.count('src="data:image/png;base64,') == FIGURES
    assert "s3://runs/demo/" in remote and "2 images failed" in remote and "PCA-5" in remote
    local = _embedded_photos(render(load_documents(str(reported_run)), str(reported_run)))
    assert remote.count("<circle ") == IMAGES_WITH_FEATURES
    assert sorted(_embedded_photos(remote).values()) == sorted(local.values())


def test_a_large_run_is_mapped_from_a_sample_of_its_shards(reported_run, monkeypatch):
    """Above report.PCA_ROWS_READ rows the report reads whole shards spread over the run, not the whole PCA table;
    class sizes still count every image and the map says of how many it shows a sample."""
    import fruitpipe.report as report

    whole = load_documents(str(reported_run))
    monkeypatch.setattr(report, "PCA_ROWS_READ", whole.pca.num_rows // 3)
    sampled = load_documents(str(reported_run))
    shards = -(-whole.manifest["images_ok"] // 16)
    assert sampled.pca.num_rows < whole.pca.num_rows and len(set(sampled.pca.column("path").to_pylist())) \
        == sampled.pca.num_rows
    assert set(sampled.pca.column("path").to_pylist()) <= set(whole.pca.column("path").to_pylist())
    assert shards >= 3
    page = render(sampled, str(reported_run))
    assert f"of {whole.manifest['images_ok']:,} images" in page
    sizes = dict(zip(*np.unique(whole.pca.column("label").to_pylist(), return_counts=True)))
    shown = set(sampled.pca.column("label").to_pylist())
    assert shown and all(f"<span>{sizes[label]:,} images</span>" in page for label in shown)
