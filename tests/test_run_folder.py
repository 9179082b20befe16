"""The run folder's lifecycle (issue 14 items 2, 4, 9): a manifest never outlives a re-run cut short and every reader
refuses a folder in progress; OUT and SRC may not hold each other; a lease keeps a second run off a folder being
written, names its holder, and is taken over once stale."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

import fruitpipe
from fruitpipe import stages
from fruitpipe.cli import main
from fruitpipe.errors import FruitpipeError
from tests.support.processes import blocked_opening_a_fifo as _blocked_opening_a_fifo
from tests.support.processes import cli as _cli
from tests.support.processes import session_members as _session_members
from tests.support.processes import snapshot as _snapshot
from tests.support.processes import wait_until as _wait_until

pytestmark = pytest.mark.spark

SETTINGS = ["--image-size", "96", "--pca-k", "3", "--shard-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def finished(demo_root, spark, cache_dir, tmp_path_factory) -> Path:
    """A finished run over the demo Training split: 72 images in 9 shards, k = 3."""
    out = tmp_path_factory.mktemp("run-folder") / "base"
    assert main(["run", str(demo_root), str(out), *SETTINGS, "--cache-dir", cache_dir]) == 0
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def _marker(out: Path) -> dict:
    return json.loads((out / "_fruitpipe_run.json").read_text())


def _write_marker(out: Path, marker: dict) -> None:
    (out / "_fruitpipe_run.json").write_text(json.dumps(marker))


def _refused(capsys, argv: list[str], expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fruitpipe: error:") and expected in err, err
    return err


def _assert_finished_with_k(out: Path, k: int) -> None:
    """The manifest describes the folder: row counts and k of what is there, and no lease is left."""
    manifest = json.loads((out / "manifest.json").read_text())
    pca, features = pd.read_parquet(out / "pca"), pd.read_parquet(out / "features")
    assert manifest["pca_k"] == k and {len(vector) for vector in pca["pca"]} == {k}
    assert manifest["outputs"]["pca"]["rows"] == len(pca) == manifest["images_ok"] == len(features)
    assert manifest["outputs"]["features"]["rows"] == len(features)
    marker = _marker(out)
    assert marker["state"] == "finished" and "lease" not in marker
    assert fruitpipe.load_run(str(out)).pca_k == k


def _pca_rewrite_started(out: Path, since: float) -> bool:
    """The manifest is withdrawn and pca/ is deleted or holds a part written since `since`."""
    if (out / "manifest.json").exists():
        return False
    with contextlib.suppress(FileNotFoundError):
        return not (out / "pca").exists() or any(p.stat().st_mtime > since for p in (out / "pca").glob("part-*"))
    return True


def test_a_finished_run_holds_no_lease(finished):
    _assert_finished_with_k(finished, 3)


def test_a_rerun_killed_while_rewriting_the_pca_leaves_no_manifest_and_every_reader_refuses(
        finished, demo_root, cache_dir, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    rerun = ["run", str(demo_root), str(out), *SETTINGS, "--pca-k", "10", "--cache-dir", cache_dir]
    started = time.time()
    process = subprocess.Popen(_cli(*rerun), start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        _wait_until(lambda: _pca_rewrite_started(out, started) or process.poll() is not None, 240,
                    "the re-run to rewrite pca/", poll_s=0.01)
        assert process.poll() is None, f"the re-run ended (exit {process.returncode}) before the kill"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        _wait_until(lambda: not _session_members(process.pid), 30, "the re-run's processes to exit", poll_s=0.2)
    finally:
        for pid in _session_members(process.pid):
            os.kill(pid, signal.SIGKILL)

    assert not (out / "manifest.json").exists()
    assert _marker(out)["state"] == "in_progress"
    cut_short = "is not a finished run (a run there was cut short); run the same command again to finish it"
    with pytest.raises(FruitpipeError, match=r"not a finished run \(a run there was cut short\)"):
        fruitpipe.load_run(str(out))
    loaded_elsewhere = dataclasses.replace(fruitpipe.load_run(str(finished)), output=str(out))
    with pytest.raises(FruitpipeError, match="not a finished run"):
        loaded_elsewhere.pca()
    _refused(capsys, ["report", str(out)], cut_short)
    _refused(capsys, ["evaluate", str(out), "--test", str(demo_root)], cut_short)
    _refused(capsys, ["transform", str(out), str(demo_root), str(tmp_path / "projected")], cut_short)
    assert not (out / "report").exists() and not (out / "evaluation").exists()
    assert not (tmp_path / "projected").exists()

    assert main(rerun) == 0
    assert "taking over" in capsys.readouterr().err
    _assert_finished_with_k(out, 10)


def test_a_run_that_fails_after_its_claim_releases_the_lease_and_stays_unfinished(
        finished, demo_root, cache_dir, tmp_path, capsys, monkeypatch):
    out = _copy(finished, tmp_path)
    rerun = ["run", str(demo_root), str(out), *SETTINGS, "--pca-k", "5", "--cache-dir", cache_dir]

    def failing_gram(*args, **kwargs):
        raise FruitpipeError("the PCA fit failed (injected)")
    with monkeypatch.context() as patched:
        patched.setattr(stages, "run_gram", failing_gram)
        _refused(capsys, rerun, "injected")
    marker = _marker(out)
    assert marker["state"] == "in_progress" and "lease" not in marker
    assert not (out / "manifest.json").exists()
    _refused(capsys, ["report", str(out)], "a run there was cut short")
    assert main(rerun) == 0
    assert "taking over" not in capsys.readouterr().err
    _assert_finished_with_k(out, 5)


def _lease(host: str, pid: int, heartbeat_age_s: float) -> dict:
    """Another run's lease, fresh for 3 minutes after its last heartbeat."""
    now = time.time()
    return {"run_id": "0" * 32, "host": host, "pid": pid, "started_unix": now - 600,
            "heartbeat_unix": now - heartbeat_age_s, "heartbeat_s": 60.0}


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_fresh_lease_refuses_every_run_and_reader_and_a_stale_one_is_taken_over(
        finished, demo_root, cache_dir, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    base = _marker(out)
    _write_marker(out, {**base, "state": "in_progress", "lease": _lease("elsewhere.example", 4242, 1.0)})
    before = _snapshot(out)
    rerun = ["run", str(demo_root), str(out), *SETTINGS, "--cache-dir", cache_dir]
    for argv in (rerun, [*rerun, "--overwrite"]):
        err = _refused(capsys, argv, f"output {out} is being written by another run")
        assert "host elsewhere.example, pid 4242, since " in err and "last heartbeat " in err
    _refused(capsys, ["report", str(out)], "a run is writing it now (host elsewhere.example, pid 4242")
    assert _snapshot(out) == before

    _write_marker(out, {**base, "state": "in_progress", "lease": _lease(socket.gethostname(), _dead_pid(), 1.0)})
    assert main(rerun) == 0
    assert "its process is gone" in capsys.readouterr().err
    _assert_finished_with_k(out, 3)

    _write_marker(out, {**base, "state": "in_progress", "lease": _lease("elsewhere.example", 4242, 3600.0)})
    assert main(rerun) == 0
    err = capsys.readouterr().err
    assert "fruitpipe: note: taking over" in err and "host elsewhere.example, pid 4242" in err
    assert re.search(r"no heartbeat for 36\d\d s", err), err
    _assert_finished_with_k(out, 3)


def test_two_runs_on_one_output_the_second_is_refused_and_the_first_completes(demo_root, spark, cache_dir,
                                                                               tmp_path, capsys):
    """The first run is held mid-extraction: once it has claimed OUT and planned its shards (the listing is done),
    one of its images (the last, in the last shard) is swapped for a FIFO, where a Python worker then waits. Meanwhile an --overwrite run
    and a plain re-run are refused with the holder named. Then the image is put back and the waiting worker killed:
    Spark's retry of its task reads the image and the first run completes."""
    source = tmp_path / "source"
    shutil.copytree(demo_root, source)
    held = sorted((source / "Training").glob("*/*.jpg"))[-1]
    image = held.read_bytes()
    out = tmp_path / "out"
    argv = ["run", str(source), str(out), *SETTINGS, "--cache-dir", cache_dir, "--read-timeout", "300"]
    env = {**os.environ, "FRUITPIPE_LEASE_HEARTBEAT_S": "1"}
    first = subprocess.Popen(_cli(*argv), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        _wait_until(lambda: (out / "_plan" / "plan.json").exists() or first.poll() is not None, 240,
                    "the first run to plan its shards", poll_s=0.01)
        held.unlink()
        os.mkfifo(held)
        victim = _blocked_opening_a_fifo(held, 120)
        assert _marker(out)["lease"]["pid"] == first.pid

        second = subprocess.run(_cli(*argv, "--overwrite"), capture_output=True, text=True, timeout=300, env=env)
        err = second.stderr.strip()
        assert second.returncode == 2 and len(err.splitlines()) == 1, err[-2000:]
        assert f"is being written by another run (host {socket.gethostname()}, pid {first.pid}, since " in err
        _refused(capsys, argv, f"(host {socket.gethostname()}, pid {first.pid}, since ")
        assert first.poll() is None

        replacement = held.with_name(".replacement")
        replacement.write_bytes(image)
        os.replace(replacement, held)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        if held.is_fifo():
            with contextlib.suppress(OSError):
                os.close(os.open(held, os.O_WRONLY | os.O_NONBLOCK))
    assert first.returncode == 0, stderr[-2000:]
    assert "images: 72 ok, 0 failed of 72 listed" in stdout
    _assert_finished_with_k(out, 3)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("layout", ["out inside src", "out inside src via a symlink", "src inside out",
                                    "src is out"])
def test_an_output_and_a_source_holding_each_other_are_refused(demo_root, cache_dir, tmp_path, capsys, layout):
    source = tmp_path / "data" / "fruits"
    shutil.copytree(demo_root, source)
    (tmp_path / "link").symlink_to(source)
    output = {"out inside src": source / "out", "out inside src via a symlink": tmp_path / "link" / "runs" / "out",
              "src inside out": tmp_path / "data", "src is out": tmp_path / "link"}[layout]
    before = _snapshot(tmp_path)
    expected = {"out inside src": "is inside the source", "out inside src via a symlink": "is inside the source",
                "src inside out": "is inside the output", "src is out": "is the source folder itself"}[layout]
    _refused(capsys, ["run", str(source), str(output), *SETTINGS, "--cache-dir", cache_dir], expected)
    _refused(capsys, ["run", str(source), str(output), *SETTINGS, "--cache-dir", cache_dir, "--overwrite"], expected)
    assert _snapshot(tmp_path) == before
