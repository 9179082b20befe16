#!/usr/bin/env python
"""How close a whole fruitpipe run gets to ONNX Runtime's own speed on this machine, and where the rest goes.

One invocation, one machine:
  1. a FULL-size demo dataset (131 classes x 517 images, 67,692 selected), generated once into data/bench-full;
  2. the inference-only ceiling: the run's ONNX model, session options, batch size and parallelism
     (one process per Spark task slot, threads_per_task ONNX Runtime threads each) on pre-decoded tensors;
  3. `fruitpipe run` end to end as a subprocess (list, read, decode, infer, write, PCA fit + transform, outputs)
     at several sizes, with the process tree's memory sampled (driver, Spark JVM, Python workers);
  4. the int8 option: its ceiling, its end-to-end speed and how close its features are to fp32.

    python bench/run_bench.py            # the full benchmark (about 20 minutes on 2 cores)
    python bench/run_bench.py --quick    # about one minute: small dataset, default model, the ratio line
    python bench/run_bench.py --sweep    # the measurements behind the defaults (decode, threads, batch, shard)

Results are printed and written to output/bench/results.json (BENCHMARKS.md quotes them).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fruitpipe.config import DEFAULT_CACHE_DIR, RunConfig  # noqa: E402
from fruitpipe.images import Preprocessing, model_pixels, preprocess  # noqa: E402

FULL_IMAGES = 67_692
FULL_CLASSES, FULL_PER_CLASS = 131, 517
QUICK_CLASSES, QUICK_PER_CLASS = 20, 60
DEFAULT_MODEL = RunConfig.model
STARTUP_IMAGES = 64
CEILING_SECONDS = 20.0
TENSOR_SAMPLE = 256
ORIGINAL_STUDY_IMAGES_PER_S = 13.6
SAMPLE_EVERY_S = 0.5


@dataclass
class EndToEnd:
    """One `fruitpipe run`: its own timings (model_info.json), the wall clock, and peak memory of its processes."""

    label: str
    model: str
    precision: str
    images: int
    wall_s: float
    seconds: dict[str, float]
    shard_seconds_summed: dict[str, float]
    images_per_second: float
    peak_rss_bytes: int
    peak_pss_bytes: int
    peak_processes: int
    load_before: float
    output: str
    extra_args: list[str] = field(default_factory=list)

    @property
    def spark_and_other_s(self) -> float:
        """Total minus the named phases: Spark session start, progress/teardown and bookkeeping."""
        named = sum(v for k, v in self.seconds.items() if k != "total")
        return self.seconds["total"] - named


def machine() -> dict:
    """CPU model, cores, memory and load: what the numbers were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        pass
    vector = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "vector_isa": vector,
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "platform": platform.platform(), "load_average": os.getloadavg()}


def ensure_dataset(root: Path, classes: int, per_class: int) -> float:
    """Generate the demo dataset once; a stamp beside it records what is there. Returns seconds spent."""
    from fruitpipe.demo_data import generate_demo_dataset

    stamp = root.with_name(root.name + ".json")
    wanted = {"classes": classes, "per_class": per_class, "test_per_class": 1, "seed": 0}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return 0.0
    started = time.perf_counter()
    print(f"generating {classes} x {per_class} demo images in {root} (once; ~5 ms an image per core)", flush=True)
    generate_demo_dataset(str(root), classes=classes, per_class=per_class, seed=0, test_per_class=1)
    stamp.write_text(json.dumps(wanted))
    return time.perf_counter() - started


@dataclass(frozen=True)
class Model:
    """An exported (and maybe quantized) model exactly as a run would build it."""

    name: str
    weights: str | None
    precision: str
    path: str
    key: str
    preprocessing: Preprocessing

    @property
    def label(self) -> str:
        return f"{self.name}{'/random' if self.weights else ''}/{self.precision}"

    def run_args(self) -> list[str]:
        args = ["--model", self.name, "--precision", self.precision]
        return args + (["--weights", self.weights] if self.weights else [])


def build_model(name: str, weights: str | None, precision: str, source: Path, limit: int) -> Model:
    """Export (cached) and, for int8, quantize on the same calibration sample the run will use."""
    from fruitpipe.config import build_config
    from fruitpipe.models import export_onnx, get_spec

    spec = get_spec(name)
    exported = export_onnx(spec, weights, DEFAULT_CACHE_DIR)
    preprocessing = spec.preprocessing(exported.input_size)
    path, key = exported.path, exported.onnx_sha256
    if precision == "int8":
        from fruitpipe.quantize import quantize_for_run

        config = build_config({}, {"source": str(source), "output": str(REPO / "output" / "bench" / "unused"),
                                   "model": name, "weights": weights, "precision": precision, "limit": limit})
        path, key = quantize_for_run(exported, preprocessing, config)
    return Model(name, weights, precision, path, key, preprocessing)


def sample_tensors(source: Path, preprocessing: Preprocessing, count: int = TENSOR_SAMPLE) -> np.ndarray:
    """Decoded, resized uint8 pixels of `count` images spread over the classes (what the exported graph takes):
    the ceiling's input."""
    paths = sorted((source / "Training").glob("*/*.jpg"))
    picks = paths[:: max(1, len(paths) // count)][:count]
    return np.stack([model_pixels(p.read_bytes(), preprocessing)[0] for p in picks])


def _ceiling_worker(model_path: str, model_key: str, threads: int, batches: np.ndarray, seconds: float,
                    spinning: bool | None, barrier, results) -> None:
    from fruitpipe.inference import create_session, extract_features, session_for

    if spinning is None:
        session = session_for(model_key, lambda: Path(model_path).read_bytes(), threads)
    else:
        session = create_session(Path(model_path).read_bytes(), threads, allow_spinning=spinning)
    extract_features(session, batches[0])
    barrier.wait()
    started, done, index = time.perf_counter(), 0, 0
    while time.perf_counter() - started < seconds:
        extract_features(session, batches[index % len(batches)])
        done += batches.shape[1]
        index += 1
    results.put(done / (time.perf_counter() - started))


def ceiling(model: Model, tensors: np.ndarray, processes: int, threads: int, batch_size: int,
            seconds: float = CEILING_SECONDS, spinning: bool | None = None) -> float:
    """Images/s of `processes` processes x `threads` ORT threads running the model flat out on ready tensors."""
    usable = (len(tensors) // batch_size) * batch_size
    batches = np.ascontiguousarray(tensors[:usable].reshape(-1, batch_size, *tensors.shape[1:]))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_ceiling_worker,
                               args=(model.path, model.key, threads, batches, seconds, spinning, barrier, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    rates = [results.get(timeout=seconds + 300) for _ in workers]
    for worker in workers:
        worker.join()
    return float(sum(rates))


class TreeSampler(threading.Thread):
    """Peak summed RSS and PSS over a process and all its descendants (JVM, Python daemon and workers)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.wait(SAMPLE_EVERY_S):
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            rss = pss = 0
            for process in tree:
                try:
                    info = process.memory_full_info()
                except psutil.Error:
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(tree))

    def stop(self) -> None:
        self._finished.set()
        self.join()


def run_end_to_end(label: str, source: Path, model: Model, selection: list[str], out_root: Path,
                   extra: list[str] | None = None) -> EndToEnd:
    """`fruitpipe run` in a fresh process (its own Spark session), timed and memory-sampled."""
    output = out_root / label
    log = out_root / f"{label}.log"
    command = [sys.executable, "-m", "fruitpipe.cli", "run", str(source), str(output), *selection,
               *model.run_args(), "--overwrite", *(extra or [])]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "wb") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
        sampler = TreeSampler(process.pid)
        sampler.start()
        code = process.wait()
        sampler.stop()
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {code}; see {log}")
    info = json.loads((output / "model_info" / "model_info.json").read_text())
    images = int(info["counts"]["images_listed"])
    return EndToEnd(label=label, model=model.name, precision=model.precision, images=images, wall_s=wall,
                    seconds=info["seconds"], shard_seconds_summed=info["shard_seconds_summed"],
                    images_per_second=images / info["seconds"]["total"], peak_rss_bytes=sampler.peak_rss,
                    peak_pss_bytes=sampler.peak_pss, peak_processes=sampler.peak_processes, load_before=load,
                    output=str(output), extra_args=list(extra or []))


def feature_agreement(fp32_run: str, int8_run: str, knn_sample: int = 5000) -> dict:
    """Cosine similarity of int8 to fp32 features (same images), and 5-NN accuracy of each on a sample."""
    import pyarrow.parquet as pq

    def load(run: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = pq.read_table(Path(run) / "features", columns=["image_id", "label_index", "features"])
        order = np.argsort(table.column("image_id").to_numpy(zero_copy_only=False))
        flat = table.column("features").combine_chunks().flatten().to_numpy()
        matrix = flat.reshape(table.num_rows, -1)
        return (table.column("image_id").to_numpy(zero_copy_only=False)[order], matrix[order],
                table.column("label_index").to_numpy()[order])

    ids32, f32, labels = load(fp32_run)
    ids8, f8, _ = load(int8_run)
    if not np.array_equal(ids32, ids8):
        raise SystemExit("the fp32 and int8 runs did not produce features for the same images")
    cosine = (f32 * f8).sum(axis=1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(f8, axis=1) + 1e-12)
    result = {"images": int(len(ids32)), "cosine_mean": float(cosine.mean()),
              "cosine_p01": float(np.quantile(cosine, 0.01)), "cosine_min": float(cosine.min())}
    try:
        from sklearn.model_selection import cross_val_score
        from sklearn.neighbors import KNeighborsClassifier
    except ImportError:
        return result
    rows = np.random.default_rng(0).choice(len(ids32), size=min(knn_sample, len(ids32)), replace=False)
    for name, matrix in (("fp32", f32), ("int8", f8)):
        normalised = matrix[rows] / (np.linalg.norm(matrix[rows], axis=1, keepdims=True) + 1e-12)
        scores = cross_val_score(KNeighborsClassifier(n_neighbors=5), normalised, labels[rows], cv=5)
        result[f"knn5_accuracy_{name}"] = float(scores.mean())
    result["knn_sample"] = int(len(rows))
    return result


def _gb(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"


def describe(run: EndToEnd, ceiling_rate: float | None) -> str:
    s, shard = run.seconds, run.shard_seconds_summed
    ratio = f", {run.images_per_second / ceiling_rate:.0%} of the {ceiling_rate:.0f} img/s ceiling" if ceiling_rate else ""
    return (f"{run.label}: {run.images} images, {run.images_per_second:.1f} img/s end to end{ratio}\n"
            f"    total {s['total']:.1f} s (process wall {run.wall_s:.1f} s): model export {s.get('model_export', 0):.1f}, "
            f"list {s.get('list', 0):.1f}, extract {s.get('extract', 0):.1f}, PCA fit {s.get('pca_fit', 0):.1f} "
            f"({s.get('pca_fit', 0) / s['total']:.1%}), PCA transform {s.get('pca_transform', 0):.1f}, "
            f"outputs {s.get('write_outputs', 0):.1f}, Spark start + other {run.spark_and_other_s:.1f}\n"
            f"    inside shards (summed over tasks): read {shard['read']:.1f}, decode {shard['decode']:.1f}, "
            f"resize {shard['resize']:.1f}, infer {shard['infer']:.1f}, write {shard['write']:.1f} s\n"
            f"    peak memory of the process tree ({run.peak_processes} processes): RSS {_gb(run.peak_rss_bytes)}, "
            f"PSS {_gb(run.peak_pss_bytes)}; load average before {run.load_before:.1f}")


def marginal_rate(run: EndToEnd, startup: EndToEnd) -> float:
    """Images/s once started: extra images over extra seconds relative to a tiny run (fixed costs cancel)."""
    return (run.images - startup.images) / max(1e-9, run.seconds["total"] - startup.seconds["total"])


def decode_sweep(source: Path, preprocessing: Preprocessing, count: int = 500) -> dict[str, float]:
    """Microseconds an image for each step of preprocessing and its alternatives (best of 5 passes)."""
    import simplejpeg
    from PIL import Image

    from fruitpipe.images import decode_rgb, image_size, resize_square

    paths = sorted((source / "Training").glob("*/*.jpg"))
    blobs = [p.read_bytes() for p in paths[:: max(1, len(paths) // count)][:count]]
    size = preprocessing.size
    scale, shift = preprocessing.scale_and_shift()
    images = [decode_rgb(b, size)[0] for b in blobs]
    pixels = [resize_square(i, size, preprocessing.interpolation) for i in images]

    def pil_decode(blob: bytes) -> None:
        image = Image.open(io.BytesIO(blob))
        image.draft("RGB", (size, size))
        image.load()

    def naive_normalise(p: np.ndarray) -> np.ndarray:
        return p.transpose(2, 0, 1).astype(np.float32) * scale + shift

    steps = {
        "preprocess (decode_rgb + resize + normalise)": (lambda b: preprocess(b, preprocessing), blobs),
        "PIL open + draft + load": (pil_decode, blobs),
        "simplejpeg.decode_jpeg": (lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB"), blobs),
        "decode_rgb (PIL, EXIF, mode checks)": (lambda b: decode_rgb(b, size), blobs),
        "header only (image_size)": (image_size, blobs),
        f"PIL resize to {size} ({preprocessing.interpolation})": (
            lambda i: resize_square(i, size, preprocessing.interpolation), images),
        "normalise: astype + arithmetic (before)": (naive_normalise, pixels),
        "normalise: one buffer (now)": (lambda p: _normalise(p, scale, shift, size), pixels),
    }
    result = {}
    for name, (function, items) in steps.items():
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for item in items:
                function(item)
            best = min(best, time.perf_counter() - started)
        result[name] = best / len(items) * 1e6
    return result


def _normalise(pixels: np.ndarray, scale: np.ndarray, shift: np.ndarray, size: int) -> np.ndarray:
    tensor = np.empty((3, size, size), dtype=np.float32)
    np.multiply(pixels.transpose(2, 0, 1), scale, out=tensor)
    tensor += shift
    return tensor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one minute: small dataset, default model only")
    parser.add_argument("--sweep", action="store_true", help="also measure the alternatives behind the defaults")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, FULL_IMAGES],
                        help="image counts for the default model (the scaling check)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 runs")
    parser.add_argument("--no-mobilenet", action="store_true", help="skip the mobilenet_v2 run")
    parser.add_argument("--data", type=Path, help="dataset folder (default data/bench-full or data/bench-quick)")
    parser.add_argument("--out", type=Path, default=REPO / "output" / "bench")
    args = parser.parse_args()

    defaults = RunConfig(source="-", output="-")
    slots, threads, batch = os.cpu_count() or 1, defaults.threads_per_task, defaults.batch_size
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine(), "started_unix": time.time(), "quick": args.quick,
                    "defaults": {"task_slots": slots, "threads_per_task": threads, "batch_size": batch,
                                 "shard_size": defaults.shard_size or "auto"}}
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
          f"{report['machine']['ram_gib']} GiB, load {report['machine']['load_average'][0]:.1f}", flush=True)
    if args.quick:
        source = args.data or REPO / "data" / "bench-quick"
        report["dataset_seconds"] = ensure_dataset(source, QUICK_CLASSES, QUICK_PER_CLASS)
        size = QUICK_CLASSES * QUICK_PER_CLASS
        model = build_model(DEFAULT_MODEL, None, "fp32", source, size)
        top = ceiling(model, sample_tensors(source, model.preprocessing, 64), slots, threads, batch, seconds=8.0)
        run = run_end_to_end(f"quick-{size}", source, model, ["--limit", str(size)], args.out)
        print(describe(run, top))
        extract_rate = run.images / run.seconds["extract"]
        print(f"RATIO {model.label}: end to end {run.images_per_second:.1f} img/s = "
              f"{run.images_per_second / top:.0%} of the inference-only ceiling {top:.1f} img/s "
              f"({slots} tasks x {threads} thread, batch {batch}); extraction stage alone {extract_rate / top:.0%}")
        report["quick"] = {"ceiling": top, "run": asdict(run)}
        _save(report, args.out)
        return 0

    source = args.data or REPO / "data" / "bench-full"
    report["dataset_seconds"] = ensure_dataset(source, FULL_CLASSES, FULL_PER_CLASS)
    default = build_model(DEFAULT_MODEL, None, "fp32", source, FULL_IMAGES)
    tensors = sample_tensors(source, default.preprocessing)
    if args.sweep:
        report["sweep"] = sweep(source, default, tensors, slots, batch, args.out)

    runs: dict[str, dict] = {}
    ceilings: dict[str, float] = {}
    print("\n== start-up and mini mode", flush=True)
    startup = run_end_to_end(f"startup-{STARTUP_IMAGES}", source, default, ["--limit", str(STARTUP_IMAGES)], args.out)
    mini = run_end_to_end("mini", source, default, ["--mode", "mini"], args.out)
    for run in (startup, mini):
        runs[run.label] = asdict(run)
        print(describe(run, None), flush=True)
    report["mini_wall_s"] = mini.wall_s

    print(f"\n== {default.label}: ceiling, then {args.sizes} images", flush=True)
    ceilings[default.label] = ceiling(default, tensors, slots, threads, batch)
    print(f"inference-only ceiling ({slots} processes x {threads} thread, batch {batch}): "
          f"{ceilings[default.label]:.1f} img/s", flush=True)
    scaling = {}
    for size in args.sizes:
        run = run_end_to_end(f"{DEFAULT_MODEL}-{size}", source, default, ["--limit", str(size)], args.out)
        runs[run.label] = asdict(run)
        scaling[size] = {"end_to_end": run.images_per_second, "after_startup": marginal_rate(run, startup),
                         "extract_stage": run.images / run.seconds["extract"]}
        print(describe(run, ceilings[default.label]), flush=True)
    ceilings[default.label + " (after runs)"] = ceiling(default, tensors, slots, threads, batch)
    report["scaling"] = scaling

    comparisons = [("mobilenet_v2", "random", "fp32")] if not args.no_mobilenet else []
    comparisons += [(DEFAULT_MODEL, None, "int8")] if not args.no_int8 else []
    for name, weights, precision in comparisons:
        model = build_model(name, weights, precision, source, FULL_IMAGES)
        print(f"\n== {model.label}: ceiling, then {FULL_IMAGES} images", flush=True)
        model_tensors = tensors if model.preprocessing == default.preprocessing else sample_tensors(
            source, model.preprocessing)
        ceilings[model.label] = ceiling(model, model_tensors, slots, threads, batch)
        print(f"inference-only ceiling: {ceilings[model.label]:.1f} img/s", flush=True)
        run = run_end_to_end(f"{name}-{precision}-{FULL_IMAGES}", source, model, ["--limit", str(FULL_IMAGES)],
                             args.out)
        runs[run.label] = asdict(run)
        print(describe(run, ceilings[model.label]), flush=True)
    report["ceilings"], report["runs"] = ceilings, runs
    fp32_full, int8_full = runs.get(f"{DEFAULT_MODEL}-{FULL_IMAGES}"), runs.get(f"{DEFAULT_MODEL}-int8-{FULL_IMAGES}")
    if fp32_full and int8_full:
        report["int8"] = feature_agreement(fp32_full["output"], int8_full["output"])
        report["int8"]["ceiling_speedup"] = ceilings[f"{DEFAULT_MODEL}/int8"] / ceilings[default.label]
        report["int8"]["end_to_end_speedup"] = int8_full["images_per_second"] / fp32_full["images_per_second"]
    report["machine"]["load_average_end"] = os.getloadavg()
    _save(report, args.out)
    summary(report, default.label, startup)
    return 0


def sweep(source: Path, model: Model, tensors: np.ndarray, slots: int, batch: int, out: Path) -> dict:
    """The alternatives the defaults were chosen against, each measured here and now."""
    result: dict = {}
    print("\n== sweep: preprocessing, microseconds an image (one thread)", flush=True)
    result["decode_us"] = decode_sweep(source, model.preprocessing)
    for name, value in result["decode_us"].items():
        print(f"  {name:48s} {value:8.0f}")
    print("\n== sweep: inference-only ceiling by tasks x threads and batch size", flush=True)
    layouts = [(slots, 1, batch, None), (1, slots, batch, True), (1, slots, batch, False),
               *((slots, 1, size, None) for size in (1, 4, 8, 32))]
    result["ceiling"] = {}
    for processes, threads, size, spinning in layouts:
        rate = ceiling(model, tensors, processes, threads, size, seconds=12.0, spinning=spinning)
        name = f"{processes} x {threads} threads, batch {size}" + (
            "" if spinning is None else f", spinning {'on' if spinning else 'off'}")
        result["ceiling"][name] = rate
        print(f"  {name:48s} {rate:8.1f} img/s", flush=True)
    print("\n== sweep: end to end, 10,000 images", flush=True)
    variants = {"defaults": [], "shard 512": ["--shard-size", "512"], "shard 2048": ["--shard-size", "2048"],
                "batch 1": ["--batch-size", "1"], "batch 8": ["--batch-size", "8"],
                "batch 32": ["--batch-size", "32"],
                f"1 task x {slots} threads": ["--master", "local[1]", "--threads-per-task", str(slots)]}
    result["end_to_end"] = {}
    for name, extra in variants.items():
        run = run_end_to_end(f"sweep-{name.replace(' ', '-')}", source, model, ["--limit", "10000"], out, extra)
        result["end_to_end"][name] = asdict(run)
        print(f"  {name:48s} {run.images_per_second:8.1f} img/s (extract {run.seconds['extract']:.1f} s, "
              f"infer summed {run.shard_seconds_summed['infer']:.1f} s, load {run.load_before:.1f})", flush=True)
    return result


def summary(report: dict, default_label: str, startup: EndToEnd) -> None:
    runs, ceilings = report["runs"], report["ceilings"]
    full = runs.get(f"{DEFAULT_MODEL}-{FULL_IMAGES}")
    print("\n== summary")
    if full:
        top = ceilings[default_label]
        total = full["seconds"]["total"]
        print(f"FULL {default_label}: {full['images_per_second']:.1f} img/s = {full['images_per_second'] / top:.0%} "
              f"of the ceiling {top:.1f} img/s (target >= 70%); {total / 60:.1f} min for {full['images']} images")
        print(f"PCA fit {full['seconds']['pca_fit']:.1f} s = {full['seconds']['pca_fit'] / total:.1%} of the run "
              f"(target <= 5%); peak RSS {_gb(full['peak_rss_bytes'])} (PSS {_gb(full['peak_pss_bytes'])}, "
              f"target <= 4 GiB)")
        print(f"vs the original study (3 x m5.2xlarge EMR, {ORIGINAL_STUDY_IMAGES_PER_S} img/s): "
              f"{full['images_per_second'] / ORIGINAL_STUDY_IMAGES_PER_S:.1f}x")
    print(f"mini mode (300 images): {report['mini_wall_s']:.1f} s wall including Spark start (target <= 25 s); "
          f"fixed start-up (a {startup.images}-image run): {startup.seconds['total']:.1f} s")
    rates = report["scaling"]
    for size, rate in rates.items():
        print(f"  {size:>6} images: {rate['end_to_end']:6.1f} img/s end to end, {rate['after_startup']:6.1f} img/s "
              f"after start-up, extraction stage {rate['extract_stage']:6.1f} img/s")
    after = [rate["after_startup"] for rate in rates.values()]
    if after:
        middle = (max(after) + min(after)) / 2
        print(f"  after start-up spread: +/-{(max(after) - min(after)) / 2 / middle:.0%} (target +/-15%)")
    if "int8" in report:
        q = report["int8"]
        knn = (f"; 5-NN accuracy fp32 {q['knn5_accuracy_fp32']:.3f} vs int8 {q['knn5_accuracy_int8']:.3f}"
               if "knn5_accuracy_fp32" in q else "")
        print(f"int8/fp32: ceiling x{q['ceiling_speedup']:.2f}, end to end x{q['end_to_end_speedup']:.2f}; "
              f"cosine to fp32 mean {q['cosine_mean']:.4f}, 1st percentile {q['cosine_p01']:.4f}{knn}")


def _save(report: dict, out: Path) -> None:
    path = out / ("results-quick.json" if report.get("quick") else "results.json")
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nresults written to {path}")


if __name__ == "__main__":
    sys.exit(main())
