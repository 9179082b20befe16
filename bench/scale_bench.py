#!/usr/bin/env python
"""What the driver costs per listed image: peak RSS, listing and planning time as the source grows to millions.

A run that processes a few images per class over a source of N files measures the bookkeeping alone: the driver
lists every key and plans shards however few images it then reads. The local source is N hard links to a handful
of real demo JPEGs in 100 class folders, so a million files cost seconds and no data (only directory entries); it
is deleted after its run unless --keep. `--store s3` measures the same run against a moto S3 API holding N keys.

    python bench/scale_bench.py                          # local N = 100,000 and 1,000,000 (~2 min, 2 loaded cores)
    python bench/scale_bench.py --sizes 100000 1000000 5000000     # ~12 min loaded, 4.2 GB of driver at 5 M today
    python bench/scale_bench.py --store s3 --sizes 1000000   # ~8 min loaded; moto holds the keys in 3.6 GB

Per N it prints the driver's peak RSS, the run's own phase seconds (model_info.json `seconds`: `list`, and `plan`
where the run reports one; nothing is guessed), the run's total and wall time and the driver's CPU seconds; then
the driver's growth in MB per million listed files (a least-squares fit over the sizes). Writes
output/scale-bench/results-<store>.json; BENCHMARKS.md and docs/scaling.md quote it.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.run_bench import machine, sampled_run  # noqa: E402
from bench.s3_server import REGION, InProcessMotoS3  # noqa: E402

CLASSES = 100
PER_CLASS_PROCESSED = 2
# ext4 allows 65,000 links to one file: 160 seed JPEGs serve 10 million.
SEED_CLASSES, SEED_PER_CLASS = 20, 8
MAX_LINKS_PER_FILE = 65_000
# What one directory entry of a name like `0000123.jpg` costs an ext4 htree folder, with slack for half-full
# blocks: the disk a source of hard links needs.
BYTES_PER_ENTRY = 64
SAMPLE_EVERY_S = 0.05
BUCKET = "fruitpipe-scale-bench"
# Keys a few HTTP PUTs are timed on, to compare with filling moto's backend directly.
PUT_SAMPLE_KEYS = 2_000
PUT_THREADS = 8  # a boto3 client pools 10 connections
TINY_BODY = b"\xff\xd8\xff\xd9"  # an empty JPEG: the keys no task reads need no real body
# Today's listing is one storage call (s3fs `find`, every page), cancelled after FRUITPIPE_STORAGE_TIMEOUT_S (30 s by
# default): too short for a million keys, on moto or S3. The S3 runs raise it so that they measure the listing.
LISTING_TIMEOUT_ENV = {"FRUITPIPE_STORAGE_TIMEOUT_S": "3600"}


def seed_images(data: Path) -> list[Path]:
    """The real JPEGs every source is made of (generated once under data/seeds)."""
    seeds_root = data / "seeds"
    if not (seeds_root / "Training").is_dir():
        from fruitpipe.demo_data import generate_demo_dataset

        generate_demo_dataset(str(seeds_root), classes=SEED_CLASSES, per_class=SEED_PER_CLASS, seed=0,
                              test_per_class=1)
    return sorted((seeds_root / "Training").glob("*/*.jpg"))


def relative_paths(files: int) -> Iterator[tuple[int, str]]:
    """(index in its class, path under the source) of N files spread over CLASSES class folders, in sorted order."""
    per_class = files // CLASSES
    for class_index in range(CLASSES):
        for image_index in range(per_class):
            yield image_index, f"Training/Class {class_index:03d}/{image_index:07d}.jpg"


def check_room(data: Path, files: int, seeds: list[Path]) -> None:
    """Refuse before building a source that the disk or the seeds' link counts cannot hold."""
    needed = files * BYTES_PER_ENTRY
    free = shutil.disk_usage(data).free
    if needed > free // 2:
        raise SystemExit(f"{files:,} hard links need about {needed / 2**30:.1f} GiB of directory entries; "
                         f"{free / 2**30:.1f} GiB free under {data}: use fewer --sizes")
    links = max(seed.stat().st_nlink for seed in seeds) + -(-files // len(seeds))
    if links > MAX_LINKS_PER_FILE:
        raise SystemExit(f"{files:,} files would give a seed JPEG {links:,} hard links (the filesystem allows "
                         f"{MAX_LINKS_PER_FILE:,}); remove other sources under {data} first")


def build_source(root: Path, files: int, seeds: list[Path]) -> float:
    """`files` hard links under root/Training/<class>/; returns seconds spent (0 when a --keep'd one is there)."""
    stamp = root / "files.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"files": files}:
        return 0.0
    remove_source(root)
    check_room(root.parent, files, seeds)
    started = time.perf_counter()
    for class_index in range(CLASSES):
        (root / "Training" / f"Class {class_index:03d}").mkdir(parents=True)
    for index, (_, path) in enumerate(relative_paths(files)):
        os.link(seeds[index % len(seeds)], root / path)
    stamp.write_text(json.dumps({"files": files}))
    return time.perf_counter() - started


def remove_source(root: Path) -> float:
    """Delete a source of hard links (the seeds stay); returns seconds spent."""
    started = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    return time.perf_counter() - started


def populate_bucket(moto: InProcessMotoS3, files: int, seeds: list[Path]) -> dict[str, float]:
    """Fill the bucket with N keys laid out like the local source; returns the seconds and memory it took.

    One PUT at a time over HTTP moto takes a few hundred keys a second (timed on PUT_SAMPLE_KEYS keys, which are
    then deleted), hours for millions; the server runs in this process, so the keys go straight into its backend
    instead (the same FakeKey objects a PUT makes). Only the images a run selects get a real JPEG body.
    """
    backend = moto.backend()
    backend.create_bucket(BUCKET, REGION)
    client = moto.client("s3")
    sample = [f"put-sample/{index:07d}.jpg" for index in range(PUT_SAMPLE_KEYS)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=PUT_THREADS) as pool:
        for _ in pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=TINY_BODY), sample):
            pass
    put_rate = len(sample) / (time.perf_counter() - started)
    for key in sample:
        backend.delete_object(BUCKET, key)
    bodies = [seed.read_bytes() for seed in seeds]
    rss_before = _rss_mb()
    started = time.perf_counter()
    for index, (image_index, path) in enumerate(relative_paths(files)):
        body = bodies[index % len(bodies)] if image_index < PER_CLASS_PROCESSED else TINY_BODY
        backend.put_object(BUCKET, f"src/{path}", body)
    populate_s = time.perf_counter() - started
    return {"http_put_keys_per_s": put_rate, "http_put_threads": PUT_THREADS, "populate_s": populate_s,
            "populate_keys_per_s": files / populate_s, "moto_keys_mb": _rss_mb() - rss_before}


@contextlib.contextmanager
def paged_from_an_index(moto: InProcessMotoS3) -> Iterator[None]:
    """moto answers ListObjectsV2 from a sorted index of the bucket (bisect + one page) instead of filtering and
    sorting the whole bucket for every page.

    Stock moto 5 does the latter, in time linear in the bucket (measured: 0.04 CPU s a page at 20,000 keys, 0.2 s
    at 100,000), so the 1,000 pages of a million keys would take most of an hour of moto alone; S3's own index,
    like this one, does not read the rest of the bucket for a page. The index gives the same pages (keys after the
    continuation token or StartAfter, MaxKeys of them, the same tokens); a delimiter or another bucket still goes
    to moto's own code.
    """
    backend = moto.backend()
    bucket = backend.get_bucket(BUCKET)
    names = sorted(bucket.keys.keys())
    stock = backend.list_objects_v2

    def list_objects_v2(bucket: Any, prefix: str | None, delimiter: str | None, continuation_token: str | None,
                        start_after: str | None, max_keys: int) -> tuple[list[Any], bool, str | None]:
        if bucket.name != BUCKET or delimiter:
            return stock(bucket, prefix, delimiter, continuation_token, start_after, max_keys)
        prefix = prefix or ""
        after = backend._pagination_tokens.get(continuation_token) if continuation_token else start_after
        first = bisect.bisect_left(names, prefix)
        if after:
            first = max(first, bisect.bisect_right(names, after))
        page = [name for name in names[first:first + max_keys + 1] if name.startswith(prefix)]
        return backend._truncate_result([bucket.keys[name] for name in page], max_keys)

    backend.list_objects_v2 = list_objects_v2
    try:
        yield
    finally:
        del backend.list_objects_v2


def measure(source: str, out: Path, files: int) -> dict[str, Any]:
    """One `fruitpipe run --per-class 2` over the source in a fresh process, memory sampled, CPU counted."""
    command = [sys.executable, "-m", "fruitpipe.cli", "run", source, str(out), "--per-class",
               str(PER_CLASS_PROCESSED), "--overwrite", "--quiet"]
    load = os.getloadavg()[0]
    cpu_before = _children_cpu_s()
    wall, sampler = sampled_run(command, out.with_suffix(".log"), SAMPLE_EVERY_S)
    info = json.loads((out / "model_info" / "model_info.json").read_text())
    return {"files": files, "wall_s": wall,
            "driver_cpu_s": _children_cpu_s() - cpu_before, "load_before": load,
            "driver_peak_rss_mb": sampler.peak_root_rss / 2**20, "tree_peak_rss_mb": sampler.peak_rss / 2**20,
            "seconds": info["seconds"]}


def growth_per_million(runs: list[dict[str, Any]]) -> float | None:
    """Least-squares slope of the driver's peak RSS over the listed files, in MB per million (None below 2 sizes)."""
    if len({run["files"] for run in runs}) < 2:
        return None
    xs = [run["files"] / 1e6 for run in runs]
    ys = [run["driver_peak_rss_mb"] for run in runs]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    return (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
            / sum((x - mean_x) ** 2 for x in xs))


def report(result: dict[str, Any]) -> str:
    """One line per size: what the run itself reports, no phase guessed."""
    seconds = result["seconds"]
    phases = ", ".join(f"{name} {seconds[name]:.1f} s" if name in seconds else f"{name}: not reported"
                       for name in ("list", "plan"))
    return (f"{result['files']:>9,} files: driver peak RSS {result['driver_peak_rss_mb']:6.0f} MB "
            f"(tree {result['tree_peak_rss_mb']:.0f} MB), {phases}, run total {seconds['total']:.1f} s, "
            f"wall {result['wall_s']:.1f} s, {result['driver_cpu_s']:.1f} driver CPU s "
            f"(load {result['load_before']:.1f} before)")


def run_local(sizes: list[int], data: Path, out: Path, keep: bool) -> list[dict[str, Any]]:
    seeds = seed_images(data)
    results = []
    for files in sizes:
        source = data / f"n{files}"
        try:
            built = build_source(source, files, seeds)
            result = {**measure(str(source), out / f"local-n{files}", files), "build_source_s": built}
        finally:
            removed = 0.0 if keep else remove_source(source)
        results.append({**result, "remove_source_s": removed})
        print(report(results[-1]), flush=True)
    return results


def run_s3(sizes: list[int], data: Path, out: Path) -> list[dict[str, Any]]:
    seeds = seed_images(data)
    results = []
    for files in sizes:
        with InProcessMotoS3() as moto:
            setup = populate_bucket(moto, files, seeds)
            print(f"{files:>9,} keys: HTTP PUT {setup['http_put_keys_per_s']:,.0f} keys/s ({PUT_THREADS} threads, "
                  f"{PUT_SAMPLE_KEYS:,} timed); filled moto's backend directly in {setup['populate_s']:.1f} s "
                  f"({setup['populate_keys_per_s']:,.0f} keys/s), moto holds them in "
                  f"{setup['moto_keys_mb']:,.0f} MB", flush=True)
            settings = {**moto.env(), **LISTING_TIMEOUT_ENV}
            saved = {name: os.environ.get(name) for name in [*settings, "AWS_PROFILE"]}
            os.environ.pop("AWS_PROFILE", None)
            os.environ.update(settings)
            try:
                with paged_from_an_index(moto):
                    result = measure(f"s3://{BUCKET}/src", out / f"s3-n{files}", files)
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        results.append({**result, **setup})
        print(report(result), flush=True)
    return results


def _rss_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _children_cpu_s() -> float:
    """User + system CPU of this process's finished children: the run's driver (and what it reaped; not the local
    pool's workers, whose parent is the pool's fork server)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _stop_on_sigterm(signum: int, frame: object) -> NoReturn:
    """SIGTERM unwinds like Ctrl-C, so a source being measured is still deleted and moto stopped."""
    raise SystemExit(128 + signum)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--store", choices=("local", "s3"), default="local")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "scale")
    parser.add_argument("--out", type=Path, default=REPO / "output" / "scale-bench")
    parser.add_argument("--keep", action="store_true", help="keep the local sources for the next invocation")
    args = parser.parse_args()
    if min(args.sizes) < CLASSES * PER_CLASS_PROCESSED:
        parser.error(f"each size must be at least {CLASSES * PER_CLASS_PROCESSED} (the images a run processes)")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    args.data.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    host = machine()
    print(f"machine: {host['cpu']}, {host['cores']} cores, {host['ram_gib']} GiB, "
          f"load {host['load_average'][0]:.1f}", flush=True)
    sizes = sorted(set(args.sizes))
    if args.store == "local":
        results = run_local(sizes, args.data, args.out, args.keep)
    else:
        results = run_s3(sizes, args.data, args.out)
    growth = growth_per_million(results)
    if growth is not None:
        print(f"driver peak RSS grows {growth:.0f} MB per million listed files (least squares over "
              f"{len(results)} sizes; target < 100)")
    figures = {"machine": host, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "store": args.store,
               "runs": results, "driver_mb_per_million_files": growth}
    (args.out / f"results-{args.store}.json").write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
