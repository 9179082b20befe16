"""On S3 (moto_server on loopback) an object rewritten in place with the same size changes the listing: its ETag is
part of the image's identity, so a re-run extracts the changed image again instead of resuming stale features."""

from __future__ import annotations

import datetime

import pytest

from fruitpipe import storage
from tests.support.compare import listing_digest
from tests.support.images import bmp as _bmp
from tests.support.s3 import create_bucket

pytestmark = pytest.mark.s3


def test_a_same_size_rewrite_on_s3_changes_the_version_and_thelisting_digest(moto, s3_process_env):
    client = create_bucket(moto, "fruitpipe-listing")
    for index in range(3):
        client.put_object(Bucket="fruitpipe-listing", Key=f"src/Training/Apple/{index}.bmp", Body=_bmp(index))
    location = storage.locate("s3://fruitpipe-listing/src")
    before = storage.find_files(location, location.path)
    digest = listing_digest("s3://fruitpipe-listing/src")

    client.put_object(Bucket="fruitpipe-listing", Key="src/Training/Apple/1.bmp", Body=_bmp(99))
    after = storage.find_files(location, location.path)
    key = "fruitpipe-listing/src/Training/Apple/1.bmp"
    assert after[key].size == before[key].size
    assert after[key].version and after[key].version != before[key].version
    assert not after[key].version.startswith('"')
    assert all(after[path] == before[path] for path in before if path != key)
    assert listing_digest("s3://fruitpipe-listing/src") != digest


def test_an_object_without_etag_is_versioned_by_its_last_modified_time():
    modified = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)
    assert storage._object_version({"ETag": '"abc"', "LastModified": modified}) == "abc"
    assert storage._object_version({"LastModified": modified}) == str(modified)
    assert storage._object_version({}) == ""



def test_an_s3_prefix_is_listed_page_by_page_with_the_same_result(moto, s3_process_env, monkeypatch):
    client = create_bucket(moto, "fruitpipe-pages")
    keys = [f"src/Training/Apple/{index}.bmp" for index in range(7)] + ["src/Training/Pear/", "src/x.txt"]
    for index, key in enumerate(keys):
        client.put_object(Bucket="fruitpipe-pages", Key=key, Body=b"" if key.endswith("/") else _bmp(index))
    location = storage.locate("s3://fruitpipe-pages/src")
    whole = {path: storage.ListedFile(int(info["size"]), storage._object_version(info))
             for path, info in location.fs.find(location.path, detail=True).items() if not path.endswith("/")}
    pages = []
    real_call = storage.Location.call
    monkeypatch.setattr(storage, "LIST_PAGE_KEYS", 3)
    monkeypatch.setattr(storage.Location, "call", lambda self, method, *args, **kwargs: (
        pages.append(kwargs.get("ContinuationToken")), real_call(self, method, *args, **kwargs))[1])
    assert storage.find_files(location, location.path) == whole and len(whole) == 8
    assert len(pages) == 3 and pages[0] is None and all(pages[1:])
    assert storage.find_files(storage.locate("s3://fruitpipe-no-such-bucket/src"), "fruitpipe-no-such-bucket/src") \
        == {}
