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


def test_the_default_k_applies_only_without_a_variance_target():
    """--pca-k beside --pca-variance is refused, but the default k (50) never counts as given."""
    from fruitpipe.config import DEFAULT_PCA_K, RunConfig, build_config
    from fruitpipe.errors import FruitpipeError

    options = {"source": "s", "output": "o"}
    assert build_config({}, options).pca_k == DEFAULT_PCA_K == RunConfig("s", "o").pca_k
    by_variance = build_config({"pca_variance": 0.9}, options)
    assert by_variance.pca_k is None and by_variance.pca_variance == 0.9
    for file_values, flags in (({"pca_k": 5}, {"pca_variance": 0.9}), ({}, {"pca_k": 5, "pca_variance": 0.9}),
                               ({"pca_variance": 0.9}, {"pca_k": 5})):
        with pytest.raises(FruitpipeError, match="--pca-k 5 and --pca-variance 0.9 both given"):
            build_config(file_values, {**options, **flags})
    with pytest.raises(FruitpipeError, match="both given"):
        RunConfig("s", "o", pca_k=5, pca_variance=0.9).validate()


SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPLANTED0SECRET"


@pytest.mark.parametrize("config_text, expected", [
    (f"weights: {{aws_secret_access_key: {SECRET}}}\n", "option weights has the wrong type: must be a string, "
                                                        "got a mapping"),
    (f"pca_k: [{SECRET}]\n", "option pca_k has the wrong type: must be an integer, got a list"),
    (f"overwrite: {{password: {SECRET}}}\n", "must be true or false, got a mapping"),
    (f"split: {SECRET}\n", "unknown split a string (not shown)"),
    (f"precision: {SECRET}\n", "unknown precision a string (not shown)"),
    (f"master: {SECRET}\n", "unknown Spark master a string (not shown)"),
    (f"spark_conf: {{spark.hadoop.fs.s3a.secret.key: [{SECRET}]}}\n", "must be a single value, got a list"),
    (f"spark_conf: {{spark.driver.memory: {SECRET}}}\n", "must be a size such as 4g or 512m, got a string (not shown)"),
])
def test_no_error_message_echoes_a_configuration_secret(capsys, tmp_path, config_text, expected):
    config = tmp_path / "fruitpipe.yaml"
    config.write_text(config_text)
    _fails_cleanly(capsys, ["--config", str(config), "run", "src", str(tmp_path / "out")], expected)


def test_a_secret_typed_as_a_spark_setting_without_a_value_is_not_echoed(capsys, tmp_path):
    _fails_cleanly(capsys, ["run", "src", str(tmp_path / "out"), "--spark-conf", SECRET], "expects key=value")
    assert SECRET not in capsys.readouterr().err


@pytest.mark.parametrize("setting, ok", [("4g", True), ("512m", True), ("1024", True), ("2gb", True), ("4 g", False),
                                         ("lots", False), ("-1g", False)])
def test_jvm_sizes_are_checked_before_spark_starts(setting, ok):
    from fruitpipe.config import build_config
    from fruitpipe.errors import FruitpipeError

    options = {"source": "s", "output": "o", "spark_conf": {"spark.executor.memory": setting}}
    if ok:
        assert build_config({}, options).spark_conf["spark.executor.memory"] == setting
    else:
        with pytest.raises(FruitpipeError, match="spark.executor.memory must be a size"):
            build_config({}, options)


@pytest.mark.parametrize("master, ok", [("local", True), ("local[*]", True), ("local[2,4]", True), ("yarn", True),
                                        ("spark://a:7077,b:7077", True), ("k8s://https://h:443", True),
                                        ("garbage!!", False), ("spark:/a", False), ("localhost", False)])
def test_a_master_spark_would_refuse_is_refused_first(master, ok):
    from fruitpipe.config import build_config
    from fruitpipe.errors import FruitpipeError

    if ok:
        assert build_config({}, {"source": "s", "output": "o", "master": master}).master == master
    else:
        with pytest.raises(FruitpipeError, match="unknown Spark master"):
            build_config({}, {"source": "s", "output": "o", "master": master})
