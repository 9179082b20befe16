"""On S3 (moto_server on loopback) an object rewritten in place with the same size changes the listing: its ETag is
part of the image's identity, so a re-run refuses the changed source instead of resuming stale features."""

from __future__ import annotations

import datetime

import pytest

from fruitpipe import pipeline, storage
from fruitpipe.dataset import list_split
from fruitpipe.records import records_digest
from tests.support.images import bmp as _bmp
from tests.support.s3 import create_bucket

pytestmark = pytest.mark.s3


def _listing_digest(source: str) -> str:
    """What the run marker records as `listing_sha256` for a full run over `source`."""
    shards = pipeline.plan_shards(list_split(source, "Training").images, 8)
    return records_digest(row for rows in shards.values() for row in rows)


def test_a_same_size_rewrite_on_s3_changes_the_version_and_the_listing_digest(moto, s3_process_env):
    client = create_bucket(moto, "fruitpipe-listing")
    for index in range(3):
        client.put_object(Bucket="fruitpipe-listing", Key=f"src/Training/Apple/{index}.bmp", Body=_bmp(index))
    location = storage.locate("s3://fruitpipe-listing/src")
    before = storage.find_files(location, location.path)
    digest = _listing_digest("s3://fruitpipe-listing/src")

    client.put_object(Bucket="fruitpipe-listing", Key="src/Training/Apple/1.bmp", Body=_bmp(99))
    after = storage.find_files(location, location.path)
    key = "fruitpipe-listing/src/Training/Apple/1.bmp"
    assert after[key].size == before[key].size
    assert after[key].version and after[key].version != before[key].version
    assert not after[key].version.startswith('"')
    assert all(after[path] == before[path] for path in before if path != key)
    assert _listing_digest("s3://fruitpipe-listing/src") != digest


def test_an_object_without_etag_is_versioned_by_its_last_modified_time():
    modified = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    assert storage._object_version({"ETag": '"abc"', "LastModified": modified}) == "abc"
    assert storage._object_version({"LastModified": modified}) == str(modified)
    assert storage._object_version({}) == ""

