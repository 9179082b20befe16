#!/usr/bin/env python
"""What growing a run by ~10 % costs against its first run: wall clock, CPU seconds and extraction time.

One invocation: a demo dataset (CLASSES x PER_CLASS training images), every tenth image of each class held out;
the first run over the rest, then the held-out images put back and the same command run again (the run grows:
only they are extracted, the PCA is refitted from the shards' stored statistics, every image re-projected). For
comparison a run from scratch over the grown source, into another folder.

    python bench/grow_bench.py                          # 20 classes x 60 images (34 s on 2 loaded cores)
    python bench/grow_bench.py --classes 10 --per-class 30 --json output/bench/grow.json

Each run is a `fruitpipe run` process of its own; its CPU seconds are those of the process and everything it
started (the local engine's pool workers; Spark's JVM and PySpark workers with --engine spark), sampled every
SAMPLE_S, interpreter start included; its phases (list, extract, PCA fit and projection, outputs) come from its
model_info.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fruitpipe.demo_data import generate_demo_dataset  # noqa: E402
from fruitpipe.run_folder import load_run  # noqa: E402

HELD_OUT_EVERY = 10
SAMPLE_S = 0.1


def tree_cpu_seconds(process: subprocess.Popen) -> float:
    """CPU seconds (user + system) of `process` and every process it starts, sampled every SAMPLE_S until it ends:
    the local pool's workers and Spark's JVM and PySpark workers included, whoever reaps them."""
    root = psutil.Process(process.pid)
    seen: dict[int, float] = {}
    while process.poll() is None:
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for member in members:
            try:
                times = member.cpu_times()
            except psutil.NoSuchProcess:
                continue
            seen[member.pid] = max(seen.get(member.pid, 0.0), times.user + times.system)
        time.sleep(SAMPLE_S)
    if process.wait() != 0:
        raise SystemExit(f"fruitpipe run failed with status {process.returncode}")
    return sum(seen.values())


def timed_run(source: Path, output: Path, options: list[str]) -> dict:
    """One `fruitpipe run` in its own process, with its wall and CPU seconds, its phases and what it extracted."""
    wall = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "run", str(source), str(output), "--quiet",
                                *options], stdout=subprocess.DEVNULL)
    cpu = tree_cpu_seconds(process)
    wall = time.perf_counter() - wall
    result = load_run(str(output))
    phases = ("list", "extract", "pca_fit", "pca_transform", "write_outputs", "total")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            **{f"{phase}_s": round(result.seconds[phase], 2) for phase in phases},
            "images": result.images_ok, "shards": result.shards_total, "shards_resumed": result.shards_resumed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--engine", default="local", choices=["local", "spark"])
    parser.add_argument("--cache-dir", default=None, help="model cache (default: fruitpipe's)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    options = ["--engine", args.engine, *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]
    with tempfile.TemporaryDirectory(prefix="grow-bench-") as folder:
        root = Path(folder)
        source, parked = root / "fruits", root / "parked"
        generate_demo_dataset(str(source), classes=args.classes, per_class=args.per_class, seed=0, test_per_class=1)
        parked.mkdir()
        held = [image for class_folder in sorted((source / "Training").iterdir())
                for image in sorted(class_folder.glob("*.jpg"))[::HELD_OUT_EVERY]]
        for number, image in enumerate(held):
            shutil.move(image, parked / str(number))
        # model export and runtime choice out of the timed runs
        timed_run(source, root / "warm-up", [*options, "--limit", "8", "--pca-k", "2"])
        first = timed_run(source, root / "out", options)
        for number, image in enumerate(held):
            shutil.move(parked / str(number), image)
        grown = timed_run(source, root / "out", options)
        scratch = timed_run(source, root / "scratch", options)
    figures = {"classes": args.classes, "per_class": args.per_class, "engine": args.engine, "added": len(held),
               "first": first, "grow": grown, "from_scratch": scratch,
               "grow_over_first": {key: round(grown[key] / first[key], 3) for key in ("wall_s", "cpu_s", "extract_s", "total_s")}}
    for name in ("first", "grow", "from_scratch"):
        print(f"{name:13s} {figures[name]}")
    print(f"grow / first  {figures['grow_over_first']}  ({len(held)} images added to {first['images']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
