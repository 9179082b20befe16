#!/usr/bin/env python
"""How long fruitpipe's driver takes to list a Fruits-360-sized S3 prefix, and how that compares with a FULL run.

One invocation, one machine:
  1. a moto S3 server on loopback (bench/s3_server.py), with dummy credentials;
  2. N small objects laid out like Fruits-360 (`fruits/Training/<class>/<n>_100.jpg`), uploaded concurrently;
     the bodies are a few bytes, because only the listing is measured, never the reading;
  3. the listing exactly as `fruitpipe run SRC OUT --mode full` does it on the driver (the run's `list` phase:
     `dataset.list_split`, which is one flat `storage.find_files`, then `dataset.select`), repeated, with the
     ListObjectsV2 pages it sent counted.

    python bench/list_bench.py                           # 67,692 keys, 131 classes (~5 min on 2 cores, mostly upload)
    python bench/list_bench.py --keys 5000 --classes 20  # a quick check
    python bench/list_bench.py --json output/bench/list.json

moto answers from memory on the same cores, so these seconds are fruitpipe's client-side cost plus moto's, not
AWS's latency; the page count is what holds on any S3 API.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run_bench import machine  # noqa: E402
from bench.s3_server import MotoS3  # noqa: E402
from fruitpipe.config import build_config  # noqa: E402
from fruitpipe.dataset import list_split, select  # noqa: E402
from fruitpipe.demo_data import FRUITS_360_CLASSES  # noqa: E402

FULL_KEYS = 67_692
FULL_CLASSES = 131
BUCKET = "fruitpipe-list-bench"
PREFIX = "fruits"
SPLIT = "Training"
REPEATS = 3
KEYS_PER_PAGE = 1000  # the S3 API's ListObjectsV2 page size
# A boto3 client keeps 10 pooled connections; more threads would only queue on them.
UPLOAD_THREADS = 8
BODY = b"\xff\xd8\xff\xd9"  # an empty JPEG (start + end markers): a few bytes is all a listing sees
# End-to-end speed of a FULL run on the 2-core development machine (BENCHMARKS.md, bench/run_bench.py); the
# listing is compared with a run of the same number of images at this speed.
RUN_IMAGES_PER_S = 260.0


@dataclass(frozen=True)
class Listing:
    """One timed listing: how long it took (and how much of that was this process's CPU rather than moto's or
    waiting), how many images it found and selected, how many pages it sent."""

    seconds: float
    cpu_seconds: float
    images_listed: int
    images_selected: int
    other_files: int
    pages: int


class PageCounter(logging.Handler):
    """Counts the ListObjectsV2 calls s3fs makes (it logs every S3 call at DEBUG), without touching its code path."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.pages = 0

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if str(record.msg).startswith("CALL:") and isinstance(args, tuple) and args[:1] == ("list_objects_v2",):
            self.pages += 1


def layout(keys: int, classes: int) -> list[str]:
    """`keys` object keys spread evenly over `classes` class folders, named as in Fruits-360."""
    names = list(FRUITS_360_CLASSES[:classes]) + [f"Fruit {i}" for i in range(len(FRUITS_360_CLASSES), classes)]
    per_class, extra = divmod(keys, classes)
    return [f"{PREFIX}/{SPLIT}/{name}/{n}_100.jpg"
            for index, name in enumerate(names) for n in range(per_class + (index < extra))]


def upload(moto: MotoS3, keys: list[str]) -> float:
    """Create the bucket and put every key concurrently; returns the seconds spent (reported apart from listing)."""
    client = moto.client("s3")
    client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    started = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=UPLOAD_THREADS)
    try:
        for _ in pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=BODY), keys):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C, drop the queued puts instead of finishing them
    return time.perf_counter() - started


def list_like_a_run(source: str) -> Listing:
    """The driver's `list` phase of `fruitpipe run SOURCE OUT --mode full`, timed, with its pages counted."""
    config = build_config({}, {"source": source, "output": f"s3://{BUCKET}/runs/unused", "mode": "full"})
    counter = PageCounter()
    logger = logging.getLogger("s3fs")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # counted, never printed: the debug lines would only be noise
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        listing = list_split(config.source, config.split)
        images = select(listing.images, config.selection())
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
        logger.propagate = propagate
    return Listing(seconds, cpu_seconds, len(listing.images), len(images), len(listing.other_files), counter.pages)


def point_at(moto: MotoS3) -> None:
    """This process's AWS settings pointed at moto with dummy credentials, as a user's shell would set them."""
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(moto.env())


def _stop_on_sigterm(signum: int, frame: object) -> NoReturn:
    """SIGTERM unwinds like Ctrl-C, so the `with MotoS3()` block still stops the server."""
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=FULL_KEYS, help=f"objects to list (default {FULL_KEYS})")
    parser.add_argument("--classes", type=int, default=FULL_CLASSES,
                        help=f"class folders they are spread over (default {FULL_CLASSES})")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.classes < 1 or args.keys < args.classes:
        parser.error("need --classes >= 1 and --keys >= --classes")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    host = machine()
    print(f"machine: {host['cpu'] or 'unknown CPU'}, {host['cores']} cores, load {host['load_average'][0]:.1f}",
          flush=True)
    keys = layout(args.keys, args.classes)
    source = f"s3://{BUCKET}/{PREFIX}"
    with MotoS3() as moto:
        print(f"moto S3 on {moto.url}; uploading {len(keys):,} objects in {args.classes} classes "
              f"({UPLOAD_THREADS} threads)", flush=True)
        upload_s = upload(moto, keys)
        print(f"upload: {upload_s:.1f} s ({len(keys) / upload_s:,.0f} objects/s; setup, not measured below)",
              flush=True)
        point_at(moto)
        runs: list[Listing] = []
        for repeat in range(1, REPEATS + 1):
            run = list_like_a_run(source)
            runs.append(run)
            print(f"listing {repeat}/{REPEATS}: {run.seconds:.2f} s ({run.cpu_seconds:.2f} s CPU in this process), "
                  f"{run.images_listed:,} images listed, {run.images_selected:,} selected, "
                  f"{run.pages} ListObjectsV2 pages", flush=True)

    best = min(run.seconds for run in runs)
    median = statistics.median(run.seconds for run in runs)
    expected_pages = math.ceil(len(keys) / KEYS_PER_PAGE)
    complete = all(run.images_listed == run.images_selected == len(keys) and run.other_files == 0 for run in runs)
    paged = all(run.pages == expected_pages for run in runs)
    run_s = len(keys) / RUN_IMAGES_PER_S
    print(f"\n{source}: {len(keys):,} keys in {args.classes} classes")
    print(f"listing (list_split + select, as `fruitpipe run --mode full`): best {best:.2f} s, median {median:.2f} s, "
          f"{len(keys) / best:,.0f} keys/s at best")
    print(f"pages: {runs[0].pages} ListObjectsV2 calls per listing (expected {expected_pages} = "
          f"{len(keys):,} / {KEYS_PER_PAGE}, rounded up): {'ok' if paged else 'MISMATCH'}")
    print(f"keys found: {runs[0].images_listed:,} of {len(keys):,}: {'ok' if complete else 'MISMATCH'}")
    size = "a FULL run" if len(keys) == FULL_KEYS else "a run"
    print(f"vs {size} of {len(keys):,} images at ~{RUN_IMAGES_PER_S:.0f} images/s (~{run_s:.0f} s end to end): "
          f"listing is {median / run_s:.1%} of it (median)")

    if args.json:
        figures = {"machine": host, "keys": len(keys), "classes": args.classes, "upload_s": upload_s,
                   "upload_threads": UPLOAD_THREADS, "listings": [asdict(run) for run in runs], "best_s": best,
                   "median_s": median, "keys_per_s_best": len(keys) / best, "pages_expected": expected_pages,
                   "pages_ok": paged, "keys_ok": complete, "run_images_per_s": RUN_IMAGES_PER_S,
                   "run_s": run_s, "listing_share_of_run": median / run_s}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {args.json}")
    return 0 if complete and paged else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the moto server was stopped", file=sys.stderr)
        sys.exit(130)
