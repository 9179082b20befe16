"""Bad input gets one clear line on stderr, exit code 2, and nothing written."""

from __future__ import annotations

import pytest

from fruitpipe.cli import main


def _fails_cleanly(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fruitpipe: error:") and expected in err


def test_missing_source(capsys, tmp_path):
    _fails_cleanly(capsys, ["run", str(tmp_path / "nowhere"), str(tmp_path / "out")], "missing or empty")
    assert not (tmp_path / "out").exists()


def test_empty_source(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    _fails_cleanly(capsys, ["run", str(tmp_path / "empty"), str(tmp_path / "out")], "missing or empty")
    assert not (tmp_path / "out").exists()


def test_unknown_model(capsys, demo_root, tmp_path):
    _fails_cleanly(capsys, ["run", str(demo_root), str(tmp_path / "out"), "--model", "resnet9000"], "resnet9000")
    assert not (tmp_path / "out").exists()


def test_k_larger_than_feature_dimension(capsys, demo_root, tmp_path, cache_dir):
    _fails_cleanly(capsys, ["run", str(demo_root), str(tmp_path / "out"), "--pca-k", "2000",
                            "--cache-dir", cache_dir], "feature dimension 1280")
    assert not (tmp_path / "out").exists()


def test_output_folder_holding_other_files(capsys, demo_root, tmp_path, cache_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.docx").write_text("precious")
    _fails_cleanly(capsys, ["run", str(demo_root), str(tmp_path / "out"), "--overwrite", "--cache-dir", cache_dir],
                   "not a fruitpipe run")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["thesis.docx"]


@pytest.mark.parametrize("argv, expected", [
    (["run", "a", "b", "--pca-k", "zero"], "positive integer"),
    (["run", "a", "b", "--no-such-flag"], "unrecognized arguments"),
    (["run", "a", "b", "--mode", "huge"], "invalid choice"),
])
def test_bad_flags(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err


def test_config_file_sets_defaults_and_flags_override(capsys, tmp_path):
    config = tmp_path / "fruitpipe.yaml"
    config.write_text("source: /definitely/not/here\npca_k: 3000\nunknown_option: 1\n")
    _fails_cleanly(capsys, ["--config", str(config), "run"], "unknown option 'unknown_option'")
    config.write_text("source: /definitely/not/here\noutput: /tmp/x\npca_k: [1]\n")
    _fails_cleanly(capsys, ["--config", str(config), "run"], "wrong type")


def test_local_paths_become_absolute_on_the_driver_and_uris_stay(tmp_path, monkeypatch):
    """Executors on a cluster resolve a relative path against their own working directory, not the driver's."""
    from fruitpipe.config import build_config

    monkeypatch.chdir(tmp_path)
    config = build_config({"output": "s3://bucket/runs/a"}, {"source": "data/demo"})
    assert config.source == str(tmp_path / "data" / "demo")
    assert config.output == "s3://bucket/runs/a"
    assert build_config({}, {"source": "~/photos", "output": "file:///tmp/out"}).source.startswith("/")
    assert build_config({}, {"source": "x", "output": "file:///tmp/out"}).output == "file:///tmp/out"
