"""The run folder's lifecycle on S3 (moto_server on loopback): an output prefix inside the source prefix (or the
reverse) is refused, and the lease is one small JSON object rewritten whole: refreshed by its heartbeat, refusing a
second run with the holder named, taken over once stale, gone after the run."""

from __future__ import annotations

import json
import time

import pytest

import fruitpipe
from fruitpipe.cli import main
from fruitpipe.errors import FruitpipeError
from fruitpipe.run_folder import RunFolder, refuse_nested
from tests.support.processes import wait_until as _wait_until
from tests.support.s3 import create_bucket, fruitpipe_command, object_keys, read_object, s3_environment, upload_tree

pytestmark = pytest.mark.s3

BUCKET = "fruitpipe-run-folder"
SETTINGS = ["--image-size", "96", "--pca-k", "3", "--shard-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def bucket(moto, demo_root):
    """The demo dataset under s3://BUCKET/demo."""
    client = create_bucket(moto, BUCKET)
    upload_tree(client, demo_root, BUCKET, "demo")
    return client


def _marker(client, prefix: str) -> dict:
    return json.loads(read_object(client, BUCKET, f"{prefix}/_fruitpipe_run.json"))


@pytest.mark.parametrize("source, output, expected", [
    ("s3://{b}/demo", "s3://{b}/demo/out", "is inside the source"),
    ("s3://{b}/demo", "s3://{b}/demo/Training/runs/out", "is inside the source"),
    ("s3://{b}/demo", "s3://{b}/", "is inside the output"),
    ("s3://{b}/demo", "s3://{b}/demo/", "is the source folder itself"),
])
def test_an_output_and_a_source_prefix_holding_each_other_are_refused(s3_process_env, bucket, capsys, source, output,
                                                                      expected):
    before = object_keys(bucket, BUCKET, "")
    for overwrite in ([], ["--overwrite"]):
        assert main(["run", source.format(b=BUCKET), output.format(b=BUCKET), *SETTINGS, *overwrite]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert object_keys(bucket, BUCKET, "") == before


def test_prefixes_that_only_share_a_beginning_are_not_nested(s3_process_env):
    refuse_nested(f"s3://{BUCKET}/demo", f"s3://{BUCKET}/demo-runs/out")
    refuse_nested(f"s3://{BUCKET}/demo", f"s3://other-{BUCKET}/demo/out")
    refuse_nested(f"s3://{BUCKET}/demo", "/tmp/demo/out")


def test_the_lease_on_s3_beats_refuses_a_second_claim_and_is_gone_after_the_commit(s3_process_env, bucket,
                                                                                    monkeypatch):
    monkeypatch.setenv("FRUITPIPE_LEASE_HEARTBEAT_S", "0.2")
    uri = f"s3://{BUCKET}/leases/beating"
    with RunFolder(uri) as folder:
        folder.claim({"fingerprint": "f"}, replacing=False)
        first = _marker(bucket, "leases/beating")
        assert first["state"] == "in_progress" and first["fingerprint"] == "f"
        _wait_until(lambda: _marker(bucket, "leases/beating")["lease"]["heartbeat_unix"]
                    > first["lease"]["heartbeat_unix"], 10, "a heartbeat on S3")
        with pytest.raises(FruitpipeError, match=f"output {uri} is being written by another run"):
            RunFolder(uri).claim({"fingerprint": "f"}, replacing=False)
        with pytest.raises(FruitpipeError, match="a run is writing it now"):
            fruitpipe.load_run(uri)
        folder.commit({"pca_k": 1})
    marker = _marker(bucket, "leases/beating")
    assert marker["state"] == "finished" and "lease" not in marker
    assert json.loads(read_object(bucket, BUCKET, "leases/beating/manifest.json")) == {"pca_k": 1}


def test_a_run_on_s3_is_refused_by_a_fresh_lease_and_takes_over_a_stale_one(moto, bucket, cache_dir):
    prefix = "runs/leased"
    now = time.time()
    lease = {"run_id": "0" * 32, "host": "elsewhere.example", "pid": 4242, "started_unix": now - 600,
             "heartbeat_unix": now, "heartbeat_s": 60.0}
    bucket.put_object(Bucket=BUCKET, Key=f"{prefix}/_fruitpipe_run.json",
                      Body=json.dumps({"state": "in_progress", "lease": lease}).encode())
    command = ["run", f"s3://{BUCKET}/demo", f"s3://{BUCKET}/{prefix}", *SETTINGS, "--cache-dir", cache_dir]
    refused = fruitpipe_command([*command, "--overwrite"], s3_environment(moto))
    err = refused.stderr.strip()
    assert refused.returncode == 2 and len(err.splitlines()) == 1, err[-2000:]
    assert "is being written by another run (host elsewhere.example, pid 4242, since " in err
    assert object_keys(bucket, BUCKET, prefix) == [f"{prefix}/_fruitpipe_run.json"]

    bucket.put_object(Bucket=BUCKET, Key=f"{prefix}/_fruitpipe_run.json", Body=json.dumps(
        {"state": "in_progress", "lease": {**lease, "heartbeat_unix": now - 3600}}).encode())
    finished = fruitpipe_command([*command, "--overwrite"], s3_environment(moto))
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "fruitpipe: note: taking over" in finished.stderr and "no heartbeat for" in finished.stderr
    marker = _marker(bucket, prefix)
    assert marker["state"] == "finished" and "lease" not in marker
    manifest = json.loads(read_object(bucket, BUCKET, f"{prefix}/manifest.json"))
    assert manifest["pca_k"] == 3 and manifest["outputs"]["pca"]["rows"] == manifest["images_ok"] == 72
