"""The same run on S3: a real S3 API (moto_server on loopback), the real `fruitpipe` command, outputs compared
with the local run of the same images, and no credential anywhere in what a run writes or prints."""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from fruitpipe import storage
from fruitpipe.cli import main
from fruitpipe.inventory import build_inventory
from tests.support.compare import assert_pca_equal, vectors
from tests.support.s3 import (ACCESS_KEY, BUCKET, SECRET_KEY, create_bucket, fruitpipe_command, object_keys,
                              read_object, read_parquet_dir, s3_environment, upload_tree)

pytestmark = [pytest.mark.s3, pytest.mark.spark]

RUN_DIRECTORIES = ("features", "pca", "metadata", "errors", "_shards")


def assert_no_secret(texts: Mapping[str, bytes | str]) -> None:
    for name, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        for secret in (SECRET_KEY, ACCESS_KEY):
            assert secret.encode() not in data, f"{name} holds a credential"


@pytest.fixture(scope="module")
def s3_demo(moto, demo_root) -> Any:
    """The demo dataset under s3://BUCKET/demo, with the zero-byte folder markers an S3 console creates."""
    client = create_bucket(moto)
    upload_tree(client, demo_root, BUCKET, "demo")
    for marker in ("demo/", "demo/Training/", "demo/Training/" + sorted(os.listdir(demo_root / "Training"))[0] + "/"):
        client.put_object(Bucket=BUCKET, Key=marker, Body=b"")
    return client


@pytest.fixture(scope="module")
def s3_run(moto, s3_demo, cache_dir) -> subprocess.CompletedProcess[str]:
    """`fruitpipe run s3://… s3://…` with the settings of the shared local run (conftest's finished_run)."""
    done = fruitpipe_command(["run", f"s3://{BUCKET}/demo", f"s3://{BUCKET}/runs/demo", "--pca-k", "10",
                              "--shard-size", "20", "--features-csv", "--cache-dir", cache_dir],
                             s3_environment(moto))
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_run_from_s3_to_s3_equals_the_local_run(s3_run, s3_demo, finished_run):
    client = s3_demo
    remote_features = read_parquet_dir(client, BUCKET, "runs/demo/features")
    local_features = finished_run.features()
    assert sorted(remote_features["image_id"]) == sorted(local_features["image_id"])
    remote, local = remote_features.set_index("image_id").sort_index(), local_features.set_index("image_id").sort_index()
    assert list(remote["path"]) == list(local["path"]) and list(remote["label"]) == list(local["label"])
    np.testing.assert_allclose(vectors(remote, "features"), vectors(local, "features"), atol=1e-5)
    assert_pca_equal(read_parquet_dir(client, BUCKET, "runs/demo/pca"), finished_run.pca(), atol=1e-4)

    manifest = json.loads(read_object(client, BUCKET, "runs/demo/manifest.json"))
    local_manifest = json.loads((Path(finished_run.output) / "manifest.json").read_text())
    for key in ("images_listed", "images_ok", "images_failed", "shards", "outputs", "documents", "pca_k"):
        assert manifest[key] == local_manifest[key], key
    assert manifest["source"] == f"s3://{BUCKET}/demo"
    assert manifest["images_failed"] == 0 and manifest["images_listed"] == len(local_features)


def test_s3_run_folder_has_the_local_layout(s3_run, s3_demo, finished_run):
    local_root = Path(finished_run.output)
    keys = {key[len("runs/demo/"):] for key in object_keys(s3_demo, BUCKET, "runs/demo")}
    manifest = json.loads((local_root / "manifest.json").read_text())
    for directory in RUN_DIRECTORIES:
        local_parts = {f"{directory}/{p.name}" for p in (local_root / directory).iterdir() if not p.name.startswith(".")}
        assert {key for key in keys if key.startswith(directory + "/")} == local_parts, directory
    for document in [*manifest["documents"], "manifest.json", "_fruitpipe_run.json"]:
        assert document in keys and (local_root / document).is_file(), document
    assert not [key for key in keys if key.rsplit("/", 1)[-1].startswith(".")], "temp objects left behind"
    config = yaml.safe_load(read_object(s3_demo, BUCKET, "runs/demo/config.yaml"))
    assert config["source"] == f"s3://{BUCKET}/demo" and config["output"] == f"s3://{BUCKET}/runs/demo"


def test_inventory_of_s3_equals_the_local_inventory(s3_process_env, s3_demo, demo_root, tmp_path, capsys):
    assert main(["inventory", f"s3://{BUCKET}/demo", "--out", f"s3://{BUCKET}/inventory"]) == 0
    printed = capsys.readouterr()
    assert f"s3://{BUCKET}/inventory/images.csv" in printed.out
    build_inventory(str(demo_root), str(tmp_path))
    for name in ("images.csv", "classes.csv"):
        remote = pd.read_csv(io.BytesIO(read_object(s3_demo, BUCKET, f"inventory/{name}")))
        pd.testing.assert_frame_equal(remote, pd.read_csv(tmp_path / name))
    assert_no_secret({"stdout": printed.out, "stderr": printed.err})


def test_transform_projects_with_a_run_folder_on_s3(moto, s3_run, s3_demo, finished_run):
    done = fruitpipe_command(["transform", f"s3://{BUCKET}/runs/demo", f"s3://{BUCKET}/demo",
                              f"s3://{BUCKET}/projected"], s3_environment(moto))
    assert done.returncode == 0, done.stderr[-4000:]
    projected = read_parquet_dir(s3_demo, BUCKET, "projected/pca")
    reference = read_parquet_dir(s3_demo, BUCKET, "runs/demo/pca")
    ours, theirs = projected.set_index("image_id").sort_index(), reference.set_index("image_id").sort_index()
    assert list(ours.index) == list(theirs.index)
    np.testing.assert_allclose(vectors(ours, "pca"), vectors(theirs, "pca"), atol=1e-4)
    assert_no_secret({"transform stdout": done.stdout, "transform stderr": done.stderr})


def test_no_credential_in_any_output_object_or_printed_line(s3_run, s3_demo):
    objects = {key: read_object(s3_demo, BUCKET, key) for key in object_keys(s3_demo, BUCKET, "runs")}
    assert len(objects) > 20
    assert_no_secret({**objects, "run stdout": s3_run.stdout, "run stderr": s3_run.stderr})
    assert "images: 72 ok, 0 failed of 72 listed" in s3_run.stdout


def test_missing_credentials_are_one_clear_line(s3_process_env, s3_demo, tmp_path, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", f"s3://{BUCKET}/demo", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no credentials found" in err and f"s3://{BUCKET}/demo" in err
    assert not (tmp_path / "out").exists()


def test_listings_see_what_another_process_wrote_since(s3_process_env, s3_demo):
    """The driver's resume check and manifest must see the parts executors wrote after the driver listed."""
    driver, executor = storage.locate(f"s3://{BUCKET}/fresh"), storage.locate(f"s3://{BUCKET}/fresh")
    storage.write_bytes(executor, executor.join("_shards", "part-00000.json"), b"{}")
    assert storage.list_names(driver, driver.path) == ["_shards"]
    assert storage.list_names(driver, driver.join("_shards")) == ["part-00000.json"]
    storage.write_bytes(executor, executor.join("_shards", "part-00001.json"), b"{}")
    storage.write_bytes(executor, executor.join("pca", "part-00000.parquet"), b"x")
    assert storage.exists(driver, driver.join("pca"))
    assert storage.exists(driver, driver.join("_shards", "part-00001.json"))
    assert storage.list_names(driver, driver.path) == ["_shards", "pca"]
    storage.remove_tree(executor, executor.join("pca"))
    assert not storage.exists(driver, driver.join("pca"))


def test_source_listing_is_one_flat_paged_prefix_listing(s3_process_env, s3_demo):
    """2,100 keys in 30 class folders take 3 ListObjectsV2 pages without a delimiter, not one listing per folder."""
    client = s3_demo
    keys = [f"many/Training/class {i % 30}/r_{i}_100.jpg" for i in range(2100)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=b"x"), keys))
    location = storage.locate(f"s3://{BUCKET}/many")
    calls: list[dict] = []
    location.fs.connect()
    location.fs.s3.meta.events.register("provide-client-params.s3.ListObjectsV2",
                                        lambda params, **_: calls.append(dict(params)))
    found = storage.find_files(location, location.path)
    assert sorted(found) == sorted(f"{BUCKET}/{key}" for key in keys)
    assert len(calls) == 3
    assert all(call["Prefix"] == "many/" and not call.get("Delimiter") for call in calls)
