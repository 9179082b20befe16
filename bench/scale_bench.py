#!/usr/bin/env python
"""What the driver costs per listed image: peak RSS, listing and planning time as the source grows to millions.

A run that processes a few images per class over a source of N files measures the bookkeeping alone: the driver
lists every key and plans shards however few images it then reads. The source is N hard links to a handful of
real demo JPEGs in 100 class folders, so a million files cost seconds and no disk space to build.

    python bench/scale_bench.py                        # N = 100,000 and 1,000,000 (about 5 minutes on 2 cores)
    python bench/scale_bench.py --sizes 100000 1000000 5000000

Prints one line per N and writes output/scale-bench/results.json; BENCHMARKS.md and docs/scaling.md quote it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from run_bench import sampled_run  # noqa: E402

CLASSES = 100
PER_CLASS_PROCESSED = 2
# ext4 allows 65,000 links to one file: 160 seed JPEGs serve 10 million.
SEED_CLASSES, SEED_PER_CLASS = 20, 8
SAMPLE_EVERY_S = 0.05


def build_source(root: Path, files: int) -> float:
    """`files` hard links spread over CLASSES class folders under root/Training; returns seconds spent (0 if there)."""
    stamp = root / "files.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == {"files": files}:
        return 0.0
    from fruitpipe.demo_data import generate_demo_dataset

    started = time.perf_counter()
    seeds_root = root.parent / "seeds"
    if not (seeds_root / "Training").is_dir():
        generate_demo_dataset(str(seeds_root), classes=SEED_CLASSES, per_class=SEED_PER_CLASS, seed=0,
                              test_per_class=1)
    seeds = sorted((seeds_root / "Training").glob("*/*.jpg"))
    if root.exists():
        subprocess.run(["rm", "-rf", str(root)], check=True)
    per_class = files // CLASSES
    for class_index in range(CLASSES):
        folder = root / "Training" / f"Class {class_index:03d}"
        folder.mkdir(parents=True)
        for image_index in range(per_class):
            os.link(seeds[(class_index + image_index) % len(seeds)], folder / f"{image_index:07d}.jpg")
    stamp.write_text(json.dumps({"files": files}))
    return time.perf_counter() - started


def measure(source: Path, out: Path, files: int) -> dict:
    """One `fruitpipe run --per-class 2` over the source in a fresh process, sampled."""
    command = [sys.executable, "-m", "fruitpipe.cli", "run", str(source), str(out), "--per-class",
               str(PER_CLASS_PROCESSED), "--overwrite", "--quiet"]
    wall, sampler = sampled_run(command, out.with_suffix(".log"), SAMPLE_EVERY_S)
    seconds = json.loads((out / "model_info" / "model_info.json").read_text())["seconds"]
    return {"files": files, "wall_s": wall, "driver_peak_rss_mb": sampler.peak_root_rss / 2**20,
            "tree_peak_rss_mb": sampler.peak_rss / 2**20, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "scale")
    parser.add_argument("--out", type=Path, default=REPO / "output" / "scale-bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for files in sorted(args.sizes):
        source = args.data / f"n{files}"
        built = build_source(source, files)
        result = {**measure(source, args.out / f"n{files}", files), "build_source_s": built}
        results.append(result)
        seconds = result["seconds"]
        print(f"{files:>9,} files: driver peak RSS {result['driver_peak_rss_mb']:7.0f} MB "
              f"(tree {result['tree_peak_rss_mb']:.0f} MB), list {seconds['list']:.1f} s, "
              f"total {seconds['total']:.1f} s, wall {result['wall_s']:.1f} s", flush=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        per_million = ((last["driver_peak_rss_mb"] - first["driver_peak_rss_mb"])
                       / ((last["files"] - first["files"]) / 1e6))
        print(f"driver peak RSS grows {per_million:.0f} MB per million listed files (target < 100)")
    machine = {"cpu": _cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg()}
    (args.out / "results.json").write_text(json.dumps({"machine": machine, "runs": results}, indent=2) + "\n")
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
