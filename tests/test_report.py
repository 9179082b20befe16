"""The HTML report of a real run (with failed images and an evaluation), opened in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fruitpipe
from fruitpipe.cli import main
from tests.support.moto_server import MotoServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FIGURES = 4
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


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def _image_check(page: Path, workdir: Path) -> tuple[dict[str, str], list[str]]:
    """Open a copy of `page` with the image check added; return the body's data attributes and console lines."""
    probe = workdir / f"probe-{page.stem}.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", IMAGE_CHECK + "</body>"), encoding="utf-8")
    done = _chromium(workdir / "profile-dom", "--dump-dom", probe.as_uri())
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stdout[:500]
    attributes = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    return attributes, _console_lines(done.stderr)


@pytest.fixture(scope="module")
def reported_run(demo_root, spark, cache_dir, tmp_path_factory) -> Path:
    """A run over three demo classes plus one corrupt JPEG and one stray text file, evaluated, then reported."""
    source = tmp_path_factory.mktemp("report-source")
    labels = sorted(p.name for p in (demo_root / "Training").iterdir())[:3]
    for split in ("Training", "Test"):
        for label in labels:
            shutil.copytree(demo_root / split / label, source / split / label)
    sorted((source / "Training" / labels[0]).glob("*.jpg"))[0].write_bytes(b"\xff\xd8 truncated")
    (source / "Training" / labels[1] / "notes.txt").write_text("not an image")
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


def test_the_image_check_notices_broken_images_and_console_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<html><body><img src="missing.png"><script>console.error("broken page")</script></body></html>')
    attributes, console = _image_check(page, tmp_path)
    assert attributes == {"images": "1", "images-ok": "false"}
    assert len(console) == 1 and "broken page" in console[0]


@pytest.mark.s3
@pytest.mark.spark
def test_report_of_a_run_folder_on_s3(reported_run, monkeypatch):
    with MotoServer() as moto:
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        for name, value in moto.env().items():
            monkeypatch.setenv(name, value)
        s3 = moto.client("s3")
        s3.create_bucket(Bucket="runs", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        for path in reported_run.rglob("*"):
            relative = path.relative_to(reported_run).as_posix()
            if path.is_file() and not relative.startswith(("report/", "evaluation/test_run/")):
                s3.upload_file(str(path), "runs", f"demo/{relative}")
        assert fruitpipe.write_report("s3://runs/demo/") == "s3://runs/demo/report/index.html"
        remote = s3.get_object(Bucket="runs", Key="demo/report/index.html")["Body"].read().decode()
    assert remote.count('src="data:image/png;base64,') == FIGURES
    assert "s3://runs/demo/" in remote and "2 images failed" in remote and "PCA-5" in remote
