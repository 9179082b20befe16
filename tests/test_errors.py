"""Every failure a user can cause ends as ONE line on stderr and a sensible exit code, from the real `fruitpipe`
command (issue 14, items 7, 8, 9 and 11): no Python or Java traceback, no JVM banner, no secret, no temp file."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fruitpipe import run_folder
from fruitpipe.storage import (
    NoSpaceLeft,
    StorageUnavailable,
    locate,
    unavailable_reported,
    write_bytes,
)

FRUITPIPE = str(Path(sys.executable).with_name("fruitpipe"))
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPLANTED0SECRET"
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
SMALL_RUN = ["--limit", "24", "--shard-size", "4", "--pca-k", "3", "--quiet"]


def _fruitpipe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([FRUITPIPE, *args], capture_output=True, text=True, timeout=timeout)


def _one_line(finished: subprocess.CompletedProcess, code: int, expected: str) -> str:
    """The command exited with `code` and wrote exactly one non-empty line on stderr, holding `expected`."""
    lines = [line for line in finished.stderr.splitlines() if line.strip()]
    assert finished.returncode == code, finished.stderr[-3000:]
    assert len(lines) == 1, finished.stderr[-3000:]
    assert expected in lines[0], lines[0]
    return lines[0]


# Each case: the files it needs (made under tmp_path from the shared demo source and finished run), its arguments.
def _folder(tmp: Path, demo: Path, run: Path | None) -> None:
    (tmp / "folder").mkdir()


def _fifo(tmp: Path, demo: Path, run: Path | None) -> None:
    os.mkfifo(tmp / "photo.jpg")


def _file(tmp: Path, demo: Path, run: Path | None) -> None:
    (tmp / "file").write_text("not a folder")


def _yaml(text: str) -> Callable[[Path, Path, Path | None], None]:
    def write(tmp: Path, demo: Path, run: Path | None) -> None:
        (tmp / "fruitpipe.yaml").write_text(text)
    return write


def _run_copy(change: Callable[[Path], None]) -> Callable[[Path, Path, Path], None]:
    def copy(tmp: Path, demo: Path, run: Path) -> None:
        shutil.copytree(run, tmp / "run")
        change(tmp / "run")
    return copy


def _without_pca_model(run: Path) -> None:
    (run / run_folder.PCA_MODEL_NPZ).unlink()


def _torn_pca_part(run: Path) -> None:
    part = sorted((run / run_folder.PCA).glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])


CASES = {
    "config file is a folder": (_folder, ["--config", "{tmp}/folder", "run", "{demo}", "{tmp}/out"], "is a folder"),
    "predict a folder": (_folder, ["predict", "{tmp}/folder"], "is a folder, not an image file"),
    "predict a FIFO": (_fifo, ["predict", "{tmp}/photo.jpg"], "not a regular file (FIFO)"),
    "inventory into a file": (_file, ["inventory", "{demo}", "--out", "{tmp}/file"], "is a file"),
    "predict --top 5000": (None, ["predict", "{tmp}/x.jpg", "--top", "5000"],
                           "--top must be at most 1000 (the ImageNet classes)"),
    "--pca-k with --pca-variance": (None, ["run", "{demo}", "{tmp}/out", "--pca-k", "5", "--pca-variance", "0.9"],
                                    "both given"),
    "pca_k in YAML, --pca-variance flag": (_yaml("pca_k: 5\n"), ["--config", "{tmp}/fruitpipe.yaml", "run", "{demo}",
                                                                  "{tmp}/out", "--pca-variance", "0.9"], "both given"),
    "secret in a wrong-type value": (_yaml(f"weights:\n  aws_secret_access_key: {SECRET}\n"),
                                     ["--config", "{tmp}/fruitpipe.yaml", "run", "{demo}", "{tmp}/out"],
                                     "option weights has the wrong type: must be a string, got a mapping"),
    "secret in a Spark setting": (_yaml(f"spark_conf:\n  spark.hadoop.fs.s3a.secret.key: {{value: {SECRET}}}\n"),
                                  ["--config", "{tmp}/fruitpipe.yaml", "run", "{demo}", "{tmp}/out"],
                                  "must be a single value, got a mapping"),
    "secret-shaped mode": (_yaml(f"mode: {SECRET}\n"), ["--config", "{tmp}/fruitpipe.yaml", "run", "{demo}",
                                                         "{tmp}/out"], "unknown mode a string (not shown)"),
    "--master garbage": (None, ["run", "{demo}", "{tmp}/out", "--master", "garbage!!"], "unknown Spark master"),
    "malformed driver memory": (None, ["run", "{demo}", "{tmp}/out", "--spark-conf", "spark.driver.memory=lots"],
                                "spark.driver.memory must be a size such as 4g"),
    "a JVM that cannot start": (None, ["run", "{demo}", "{tmp}/out", "--spark-conf", "spark.driver.memory=4gb",
                                       "--cache-dir", "{cache}", *SMALL_RUN],
                                "cannot start Spark with master local[*]: Invalid maximum heap size: -Xmx4gb"),
    "Spark refuses a setting": (None, ["run", "{demo}", "{tmp}/out", "--spark-conf", "spark.executor.cores=abc",
                                       "--cache-dir", "{cache}", *SMALL_RUN], "cannot start Spark"),
    "transform without the PCA model": (_run_copy(_without_pca_model), ["transform", "{tmp}/run", "{demo}",
                                                                        "{tmp}/out"], "pca_model.npz"),
    "evaluate without the PCA model": (_run_copy(_without_pca_model), ["evaluate", "{tmp}/run", "--test", "{demo}",
                                                                       "--quiet"], "pca_model.npz"),
    "evaluate a torn Parquet part": (_run_copy(_torn_pca_part), ["evaluate", "{tmp}/run", "--test", "{demo}",
                                                                 "--limit", "6", "--quiet"], "torn"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_ends_in_one_line_and_exit_2(case, demo_root, cache_dir, tmp_path, request):
    prepare, argv, expected = CASES[case]
    if prepare is not None:
        # Only the cases that copy a finished run wait for one (made once per test session, in-process).
        run = Path(request.getfixturevalue("finished_run").output) if "{tmp}/run" in argv else None
        prepare(tmp_path, demo_root, run)
    places = {"tmp": str(tmp_path), "demo": str(demo_root), "cache": cache_dir}
    finished = _fruitpipe(*[arg.format(**places) for arg in argv])
    _one_line(finished, EXIT_USAGE, expected)
    assert SECRET not in finished.stderr + finished.stdout
    assert not (tmp_path / "out").exists()


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_ctrl_c_during_a_run_is_one_line_and_exit_130(demo_root, cache_dir, tmp_path):
    """Ctrl-C reaches the whole foreground process group: driver, JVM and Python workers."""
    out = tmp_path / "out"
    process = subprocess.Popen([FRUITPIPE, "run", str(demo_root), str(out), "--cache-dir", cache_dir, "--limit", "48",
                                "--shard-size", "2", "--pca-k", "3", "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: (out / run_folder.FEATURES).is_dir() or process.poll() is not None, 240, "extraction to start")
        assert process.poll() is None, process.communicate()[1][-3000:]
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    finished = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    _one_line(finished, EXIT_INTERRUPTED, "fruitpipe: interrupted; run the same command again to resume")
    assert not (out / run_folder.MANIFEST).exists()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Callable[[int], Path]]:
    """Mounts tmpfs folders of a given size (root only: elsewhere the in-process tests below inject ENOSPC)."""
    mounted: list[Path] = []

    def mount(size_bytes: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        kib = max(4, size_bytes // 1024)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_disk_ends_in_one_line_and_leaves_no_temp_files(demo_root, cache_dir, small_disk):
    """The disk fills on the driver (the model artifact) and, with room for the artifact only, inside the Spark tasks
    that write the shards: either way one line, exit 2, and not one temp file left (Spark retries each task)."""
    from fruitpipe.models.artifact import build_artifact

    _, onnx = build_artifact("efficientnet_lite0", None, cache_dir=cache_dir)
    for disk, where in ((small_disk(1 << 20), "/model"), (small_disk(len(onnx) + (80 << 10)), "/features")):
        finished = _fruitpipe("run", str(demo_root), str(disk / "out"), "--cache-dir", cache_dir, *SMALL_RUN)
        line = _one_line(finished, EXIT_USAGE, f"fruitpipe: error: no space left on {disk / 'out'}")
        assert where in line and "run the same command again" in line
        assert not [path for path in disk.rglob("*") if path.name.endswith(".tmp")]


def _fail_with(error: BaseException) -> Callable[[int], None]:
    def fsync(fd: int) -> None:
        raise error
    return fsync


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_write_bytes_turns_a_full_disk_into_one_line_and_removes_its_temp_file(tmp_path, monkeypatch, code):
    monkeypatch.setattr(os, "fsync", _fail_with(OSError(code, os.strerror(code))))
    out = locate(str(tmp_path))
    expected = re.escape(f"no space left on {tmp_path}/features (") + ".*writing part-00000.parquet"
    with pytest.raises(NoSpaceLeft, match=expected):
        write_bytes(out, out.join("features", "part-00000.parquet"), b"x" * 1000)
    assert list(tmp_path.rglob("*")) == [tmp_path / "features"]


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "denied"), KeyboardInterrupt()])
def test_write_bytes_removes_its_temp_file_on_any_failure(tmp_path, monkeypatch, error):
    monkeypatch.setattr(os, "fsync", _fail_with(error))
    out = locate(str(tmp_path))
    with pytest.raises(type(error)):
        write_bytes(out, out.join("part.json"), b"{}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [NoSpaceLeft, StorageUnavailable])
def test_a_task_error_reaches_the_driver_as_its_one_line(error):
    """Spark gives the driver a failed task's exception as text: the worker's traceback inside a JVM stack trace."""
    line = "no space left on /out/features (No space left on device, writing part-00003.parquet); free some space"
    text = (f"An error occurred while calling o98.collectToPython.\n: org.apache.spark.SparkException: Job aborted "
            f"due to stage failure: Task 3 in stage 1.0 failed 4 times\nTraceback (most recent call last):\n  File "
            f'"/x/worker.py", line 1\nfruitpipe.storage.{error.__name__}: {line}\n\tat org.apache.spark.api.python')
    with pytest.raises(error) as raised, unavailable_reported():
        raise RuntimeError(text)
    assert str(raised.value) == line
    with pytest.raises(RuntimeError, match="something else"), unavailable_reported():
        raise RuntimeError("something else: fruitpipe.storage.Other: no")
