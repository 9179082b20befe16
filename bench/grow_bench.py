#!/usr/bin/env python
"""What growing a run by ~10 % costs against its first run: wall clock, CPU seconds and extraction time.

One invocation: a demo dataset (CLASSES x PER_CLASS training images), every tenth image of each class held out;
the first run over the rest, then the held-out images put back and the same command run again (the run grows:
only they are extracted, the PCA is refitted from the shards' stored statistics, every image re-projected). For
comparison a run from scratch over the grown source, into another folder.

    python bench/grow_bench.py                          # 20 classes x 60 images (about 2 minutes on 2 cores)
    python bench/grow_bench.py --classes 10 --per-class 30 --json output/bench/grow.json

CPU seconds are this process's plus its finished children's (the local engine's pool workers, reaped when the run
ends); with --engine spark the PySpark workers are the JVM's children and go uncounted, so use the local engine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fruitpipe.config import build_config  # noqa: E402
from fruitpipe.demo_data import generate_demo_dataset  # noqa: E402
from fruitpipe.pipeline import run  # noqa: E402

HELD_OUT_EVERY = 10


def cpu_seconds() -> float:
    """User + system seconds of this process and its reaped children so far."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_run(source: Path, output: Path, options: dict) -> dict:
    """One `fruitpipe run` with its wall, CPU and extraction seconds and how much it extracted."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = run(build_config({}, {"source": str(source), "output": str(output), "quiet": True, **options}))
    return {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(cpu_seconds() - cpu, 2),
            "extract_s": round(result.seconds["extract"], 2), "images": result.images_ok,
            "shards": result.shards_total, "shards_resumed": result.shards_resumed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--engine", default="local", choices=["local", "spark"])
    parser.add_argument("--cache-dir", default=None, help="model cache (default: fruitpipe's)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    options = {"engine": args.engine, **({"cache_dir": args.cache_dir} if args.cache_dir else {})}
    with tempfile.TemporaryDirectory(prefix="grow-bench-") as folder:
        root = Path(folder)
        source, parked = root / "fruits", root / "parked"
        generate_demo_dataset(str(source), classes=args.classes, per_class=args.per_class, seed=0, test_per_class=1)
        parked.mkdir()
        held = [image for class_folder in sorted((source / "Training").iterdir())
                for image in sorted(class_folder.glob("*.jpg"))[::HELD_OUT_EVERY]]
        for number, image in enumerate(held):
            shutil.move(image, parked / str(number))
        run(build_config({}, {"source": str(source), "output": str(root / "warm-up"), "limit": 8, "quiet": True,
                              **options}))  # model export and runtime choice out of the timed runs
        first = timed_run(source, root / "out", options)
        for number, image in enumerate(held):
            shutil.move(parked / str(number), image)
        grown = timed_run(source, root / "out", options)
        scratch = timed_run(source, root / "scratch", options)
    figures = {"classes": args.classes, "per_class": args.per_class, "engine": args.engine, "added": len(held),
               "first": first, "grow": grown, "from_scratch": scratch,
               "grow_over_first": {key: round(grown[key] / first[key], 3) for key in ("wall_s", "cpu_s", "extract_s")}}
    for name in ("first", "grow", "from_scratch"):
        print(f"{name:13s} {figures[name]}")
    print(f"grow / first  {figures['grow_over_first']}  ({len(held)} images added to {first['images']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
