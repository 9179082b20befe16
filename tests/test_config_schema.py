"""RunConfig is the one schema: every field is read from YAML, from keywords and from its flag, and a value of the
wrong type is refused by naming the field and its type, never the value."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

import fruitpipe
from fruitpipe.cli import _run_config, build_parser
from fruitpipe.cloud.config import EmrConfig, load_emr_config
from fruitpipe.config import FIELD_TYPES, RunConfig, resolve_config
from fruitpipe.errors import FruitpipeError

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYPLANTED0SECRET"
FIELDS = [f.name for f in dataclasses.fields(RunConfig)]
# A valid value of each field that differs from its default; test_every_field_has_a_sample keeps it complete.
SAMPLES: dict[str, Any] = {
    "source": "s3://bucket/in", "output": "s3://bucket/out", "mode": "mini", "split": "Test",
    "classes": ("Apple*", "Banana"), "per_class": 7, "limit": 9, "model": "mobilenet_v2", "weights": "random",
    "image_size": 96, "precision": "int8", "runtime": "openvino", "model_file": "s3://bucket/model", "batch_size": 4,
    "shard_size": 16, "threads_per_task": 2, "pca_k": 8, "pca_variance": 0.9, "features_csv": True, "csv_merged": True,
    "master": "local[2]", "spark_conf": {"spark.executor.memory": "2g"}, "engine": "local", "read_timeout_s": 12.5,
    "read_attempts": 5, "overwrite": True, "quiet": True, "cache_dir": "/tmp/fruitpipe-cache",
}
# A value of the wrong type for each field type, and the words the refusal uses for the type it wanted.
WRONG: dict[Any, tuple[Any, str]] = {
    str: (12345, "a string"), int: (SECRET, "an integer"), float: (SECRET, "a number"),
    bool: (SECRET, "true or false"), tuple[str, ...]: ({"password": SECRET}, "a string or a list of strings"),
    Mapping[str, str]: ([SECRET], "a mapping"),
}


def _options(name: str, value: Any) -> dict[str, Any]:
    return {"source": SAMPLES["source"], "output": SAMPLES["output"], name: value}


def _plain(value: Any) -> Any:
    """A value as YAML holds it."""
    return list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping) else value


def _yaml(tmp_path, values: Mapping[str, Any]) -> str:
    path = tmp_path / "fruitpipe.yaml"
    path.write_text(yaml.safe_dump({key: _plain(value) for key, value in values.items()}))
    return str(path)


def _flag_argv(name: str, value: Any) -> list[str] | None:
    """`fruitpipe run` arguments setting field `name` to `value`, built from the flag's own definition; None when
    the field has no flag."""
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    action = next((a for a in run._actions if a.dest == name), None)
    if action is None:
        return None
    argv = ["run", SAMPLES["source"], SAMPLES["output"]]
    if not action.option_strings:
        return argv
    flag = action.option_strings[0]
    if isinstance(value, bool):
        return [*argv, flag]
    if isinstance(value, Mapping):
        return [*argv, *(token for key, item in value.items() for token in (flag, f"{key}={item}"))]
    if isinstance(value, tuple):
        return [*argv, flag, *value]
    return [*argv, flag, str(value)]


def test_every_field_has_a_sample_and_a_type_check():
    assert set(SAMPLES) == set(FIELDS) == set(FIELD_TYPES)
    assert set(FIELD_TYPES.values()) <= set(WRONG)


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_read_from_yaml(tmp_path, name):
    config = resolve_config(_yaml(tmp_path, _options(name, SAMPLES[name])), {})
    assert getattr(config, name) == SAMPLES[name]


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_is_read_from_keywords(monkeypatch, name):
    monkeypatch.setattr("fruitpipe.pipeline.run", lambda config: config)
    assert getattr(fruitpipe.run(**_options(name, SAMPLES[name])), name) == SAMPLES[name]


@pytest.mark.parametrize("name", FIELDS)
def test_every_field_with_a_flag_is_read_from_it(name):
    argv = _flag_argv(name, SAMPLES[name])
    if argv is None:
        pytest.skip(f"{name} has no flag")
    config = _run_config(build_parser().parse_args(argv))
    assert getattr(config, name) == SAMPLES[name]


def test_flags_override_the_file_and_add_spark_settings(tmp_path):
    file = _yaml(tmp_path, {**_options("batch_size", 8), "spark_conf": {"spark.a": "1"}})
    argv = ["--config", file, "run", "--batch-size", "3", "--spark-conf", "spark.b=2"]
    config = _run_config(build_parser().parse_args(argv))
    assert config.batch_size == 3 and dict(config.spark_conf) == {"spark.a": "1", "spark.b": "2"}


@pytest.mark.parametrize("name", FIELDS)
def test_a_wrong_type_is_refused_by_its_type_name(tmp_path, name):
    value, type_name = WRONG[FIELD_TYPES[name]]
    for resolve in (lambda: resolve_config(_yaml(tmp_path, _options(name, value)), {}),
                    lambda: resolve_config(None, _options(name, value))):
        with pytest.raises(FruitpipeError) as refused:
            resolve()
        message = str(refused.value)
        assert name in message and f"must be {type_name}" in message and SECRET not in message, message


@pytest.mark.parametrize("name", [name for name, kind in FIELD_TYPES.items() if kind in (int, float)])
def test_a_boolean_is_not_a_number(name):
    with pytest.raises(FruitpipeError, match=f"option {name} has the wrong type: .* got a boolean"):
        resolve_config(None, _options(name, True))


EMR_FIELDS = [f.name for f in dataclasses.fields(EmrConfig)]


@pytest.mark.parametrize("name", EMR_FIELDS)
def test_every_emr_setting_is_type_checked_from_the_same_schema(tmp_path, name):
    """The EMR section reads its field types from EmrConfig with RunConfig's checks: a wrong type is named, the
    value (which could be a key pasted in the wrong place) never is."""
    kind = dataclasses.fields(EmrConfig)[EMR_FIELDS.index(name)].type
    wrong = [SECRET] if "Mapping" in kind else ({"password": SECRET} if kind.startswith("str") else SECRET)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"emr": {name: wrong}}))
    with pytest.raises(FruitpipeError, match=f"emr.{name} ") as refused:
        load_emr_config(str(config), {})
    assert SECRET not in str(refused.value)
