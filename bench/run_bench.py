#!/usr/bin/env python
"""How close a whole fruitpipe run gets to the fastest inference this machine can do, and where the rest goes.

One invocation, one machine:
  1. a FULL-size demo dataset (131 classes x 517 images, 67,692 selected), generated once into data/bench-full;
  2. inference-only ceilings: the run's own ONNX model (fp32; int8 quantized as a run does; bf16 where the CPU has
     native bf16) on every installed runtime, in each layout a run can take (tasks x threads x batch), on
     pre-decoded pixels, and what `--runtime auto` chooses for each precision;
  3. start-up, `--mode mini` and the demo run (make demo's 600 images), wall clock in a fresh process;
  4. `fruitpipe run` end to end on the FULL set, each in a fresh process with the process tree's memory sampled:
     fp32 with auto (the default), fp32 on ONNX Runtime, and each other precision with auto; each is compared with
     the best ceiling of its precision, and its features with the ONNX Runtime fp32 run's.

    python bench/run_bench.py            # the full benchmark (about 25 minutes on 2 cores)
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
DEMO_CLASSES, DEMO_PER_CLASS = 20, 30  # `make demo`'s set
DEFAULT_MODEL = RunConfig.model
STARTUP_IMAGES = 64
CEILING_SECONDS = 10.0
TENSOR_SAMPLE = 256
ORIGINAL_STUDY_IMAGES_PER_S = 13.6
SAMPLE_EVERY_S = 0.5


@dataclass
class EndToEnd:
    """One `fruitpipe run`: its own timings (model_info.json), the wall clock, and peak memory of its processes."""

    label: str
    model: str
    precision: str
    runtime: str
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
    vector = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16", "amx_int8")
              if f" {f}" in flags]
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


def _ceiling_worker(model_path: str, runtime: str, precision: str, threads: int, processes: int,
                    batches: np.ndarray, seconds: float, spinning: bool | None, barrier, results) -> None:
    from fruitpipe import runtimes
    from fruitpipe.inference import create_session

    model_bytes = Path(model_path).read_bytes()
    if spinning is None:
        session = runtimes.load(model_bytes, threads, precision, runtime, tasks_per_node=processes)
    else:
        session = create_session(model_bytes, threads, allow_spinning=spinning)
    session.run(batches[0])
    barrier.wait()
    started, done, index = time.perf_counter(), 0, 0
    while time.perf_counter() - started < seconds:
        session.run(batches[index % len(batches)])
        done += batches.shape[1]
        index += 1
    results.put(done / (time.perf_counter() - started))


def ceiling(model: Model, tensors: np.ndarray, processes: int, threads: int, batch_size: int,
            seconds: float = CEILING_SECONDS, spinning: bool | None = None, runtime: str = "onnxruntime") -> float:
    """Images/s of `processes` processes x `threads` runtime threads running the model flat out on ready pixels,
    loaded as a run's tasks load it (OpenVINO pinned only when one process has the machine). `spinning` set
    builds ONNX Runtime sessions with idle threads spinning or not (the sweep's comparison)."""
    usable = (len(tensors) // batch_size) * batch_size
    batches = np.ascontiguousarray(tensors[:usable].reshape(-1, batch_size, *tensors.shape[1:]))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_ceiling_worker,
                               args=(model.path, runtime, model.precision, threads, processes, batches, seconds,
                                     spinning, barrier, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    rates = [results.get(timeout=seconds + 300) for _ in workers]
    for worker in workers:
        worker.join()
    return float(sum(rates))


def ceilings_table(models: dict[str, Model], tensors: np.ndarray, slots: int, seconds: float) -> list[dict]:
    """Every runtime x precision this CPU runs, in each layout a run can take: tasks x threads x batch."""
    from fruitpipe import runtimes

    layouts = [(slots, 1, 2), (slots, 1, 8), (1, slots, 8)]
    rows = []
    for precision, model in models.items():
        for runtime in runtimes.candidates(precision):
            for processes, threads, batch in layouts:
                rate = ceiling(model, tensors, processes, threads, batch, seconds=seconds, runtime=runtime)
                rows.append({"runtime": runtime, "precision": precision, "processes": processes,
                             "threads": threads, "batch": batch, "images_per_s": rate})
                print(f"  {runtime:<12} {precision:<5} {processes} x {threads} thread(s), batch {batch}: "
                      f"{rate:7.1f} img/s", flush=True)
    return rows


def auto_choices(models: dict[str, Model], threads: int, batch: int) -> dict[str, dict]:
    """What `--runtime auto` picks for each precision in the pipeline's layout, as a run would (its probe cache)."""
    from dataclasses import asdict as as_dict

    from fruitpipe import runtimes

    return {precision: as_dict(runtimes.choose(Path(model.path).read_bytes(), threads, precision, "auto", batch))
            for precision, model in models.items()}


class TreeSampler(threading.Thread):
    """Peak summed RSS and PSS over a process and all its descendants (JVM, Python daemon and workers), and the
    peak RSS of the process itself (the driver)."""

    def __init__(self, pid: int, every_s: float = SAMPLE_EVERY_S) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak_rss = self.peak_pss = self.peak_processes = self.peak_root_rss = 0
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.wait(self.every_s):
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
                if process is self.root:
                    self.peak_root_rss = max(self.peak_root_rss, info.rss)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(tree))

    def stop(self) -> None:
        self._finished.set()
        self.join()


def sampled_run(command: list[str], log: Path, every_s: float = SAMPLE_EVERY_S) -> tuple[float, TreeSampler]:
    """Run `command` from the repository root with its output in `log`, its memory sampled; (wall seconds,
    sampler). A failure ends the benchmark with the command and its log named."""
    started = time.perf_counter()
    with open(log, "wb") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
        sampler = TreeSampler(process.pid, every_s)
        sampler.start()
        code = process.wait()
        sampler.stop()
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {code}; see {log}")
    return wall, sampler


def run_end_to_end(label: str, source: Path, model: Model, selection: list[str], out_root: Path,
                   extra: list[str] | None = None) -> EndToEnd:
    """`fruitpipe run` in a fresh process (its own Spark session), timed and memory-sampled."""
    output = out_root / label
    log = out_root / f"{label}.log"
    command = [sys.executable, "-m", "fruitpipe.cli", "run", str(source), str(output), *selection,
               *model.run_args(), "--overwrite", *(extra or [])]
    load = os.getloadavg()[0]
    wall, sampler = sampled_run(command, log)
    info = json.loads((output / "model_info" / "model_info.json").read_text())
    images = int(info["counts"]["images_listed"])
    return EndToEnd(label=label, model=model.name, precision=model.precision, runtime=info["runtime"]["runtime"],
                    images=images, wall_s=wall, seconds=info["seconds"],
                    shard_seconds_summed=info["shard_seconds_summed"],
                    images_per_second=images / info["seconds"]["total"], peak_rss_bytes=sampler.peak_rss,
                    peak_pss_bytes=sampler.peak_pss, peak_processes=sampler.peak_processes, load_before=load,
                    output=str(output), extra_args=list(extra or []))


def feature_agreement(reference_run: str, other_run: str, knn_sample: int = 5000) -> dict:
    """How close another run's features are to the reference run's (same images): cosine per image, the largest
    difference, and 5-NN accuracy (5-fold) of each on a sample."""
    import pyarrow.parquet as pq

    def load(run: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        table = pq.read_table(Path(run) / "features", columns=["image_id", "label_index", "features"])
        order = np.argsort(table.column("image_id").to_numpy(zero_copy_only=False))
        flat = table.column("features").combine_chunks().flatten().to_numpy()
        matrix = flat.reshape(table.num_rows, -1)
        return (table.column("image_id").to_numpy(zero_copy_only=False)[order], matrix[order],
                table.column("label_index").to_numpy()[order])

    reference_ids, reference, labels = load(reference_run)
    other_ids, other, _ = load(other_run)
    if not np.array_equal(reference_ids, other_ids):
        raise SystemExit(f"{reference_run} and {other_run} did not produce features for the same images")
    cosine = (reference * other).sum(axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1)
                                                + 1e-12)
    result = {"images": int(len(reference_ids)), "cosine_mean": float(cosine.mean()),
              "cosine_p01": float(np.quantile(cosine, 0.01)), "cosine_min": float(cosine.min()),
              "max_abs_diff": float(np.abs(reference - other).max())}
    try:
        from sklearn.model_selection import cross_val_score
        from sklearn.neighbors import KNeighborsClassifier
    except ImportError:
        return result
    rows = np.random.default_rng(0).choice(len(reference_ids), size=min(knn_sample, len(reference_ids)),
                                           replace=False)
    for name, matrix in (("reference", reference), ("other", other)):
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
    parser.add_argument("--sizes", type=int, nargs="*", default=[],
                        help="also these image counts for the default model (the scaling check)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 runs")
    parser.add_argument("--mobilenet", action="store_true", help="also a FULL mobilenet_v2 run (random weights)")
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

    from fruitpipe import runtimes

    precisions = ["fp32"] + (["int8"] if not args.no_int8 else [])
    if runtimes.has_native_bf16():
        precisions.insert(1, "bf16")
    models = {precision: build_model(DEFAULT_MODEL, None, precision, source, FULL_IMAGES) for precision in precisions}
    print(f"\n== inference-only ceilings: each runtime x precision x layout, {CEILING_SECONDS:g} s each", flush=True)
    report["ceilings"] = ceilings_table(models, tensors, slots, CEILING_SECONDS)
    report["auto"] = auto_choices(models, threads, batch)
    for precision, choice in report["auto"].items():
        print(f"  auto, {precision}: {choice['runtime']} ({choice['reason']}; probe img/s {choice['images_per_s']})")

    runs: dict[str, dict] = {}
    print("\n== start-up, mini mode, the demo", flush=True)
    demo_source = REPO / "data" / "demo"
    ensure_dataset(demo_source, DEMO_CLASSES, DEMO_PER_CLASS)
    startup = run_end_to_end(f"startup-{STARTUP_IMAGES}", source, default, ["--limit", str(STARTUP_IMAGES)], args.out)
    mini = run_end_to_end("mini", demo_source, default, ["--mode", "mini"], args.out)
    demo = run_end_to_end("demo", demo_source, default, ["--mode", "full"], args.out)
    for run in (startup, mini, demo):
        runs[run.label] = asdict(run)
        print(describe(run, None), flush=True)
    report["mini_wall_s"], report["demo_wall_s"] = mini.wall_s, demo.wall_s

    scaling = {}
    for size in args.sizes:
        run = run_end_to_end(f"{DEFAULT_MODEL}-fp32-{size}", source, default, ["--limit", str(size)], args.out)
        runs[run.label] = asdict(run)
        scaling[size] = {"end_to_end": run.images_per_second, "after_startup": marginal_rate(run, startup),
                         "extract_stage": run.images / run.seconds["extract"]}
        print(describe(run, best_ceiling(report["ceilings"], "fp32")), flush=True)
    report["scaling"] = scaling

    # auto's fp32 run is the ONNX Runtime fp32 run when auto chose ONNX Runtime: measured once, named twice.
    auto_is_onnxruntime = report["auto"]["fp32"]["runtime"] == "onnxruntime"
    full_runs = [("fp32", "auto", [])] + ([] if auto_is_onnxruntime else [("fp32", "onnxruntime",
                                                                            ["--runtime", "onnxruntime"])])
    full_runs += [(precision, "auto", []) for precision in precisions if precision != "fp32"]
    for precision, runtime, extra in full_runs:
        label = f"{DEFAULT_MODEL}-{precision}-{runtime}-{FULL_IMAGES}"
        print(f"\n== {label}", flush=True)
        run = run_end_to_end(label, source, models[precision], ["--limit", str(FULL_IMAGES)], args.out, extra)
        runs[run.label] = asdict(run)
        print(describe(run, best_ceiling(report["ceilings"], precision)), flush=True)
    if args.mobilenet:
        model = build_model("mobilenet_v2", "random", "fp32", source, FULL_IMAGES)
        run = run_end_to_end(f"mobilenet_v2-fp32-auto-{FULL_IMAGES}", source, model, ["--limit", str(FULL_IMAGES)],
                             args.out)
        runs[run.label] = asdict(run)
        print(describe(run, None), flush=True)
    if auto_is_onnxruntime:
        runs[f"{DEFAULT_MODEL}-fp32-onnxruntime-{FULL_IMAGES}"] = runs[f"{DEFAULT_MODEL}-fp32-auto-{FULL_IMAGES}"]
    report["runs"] = runs
    reference = runs[f"{DEFAULT_MODEL}-fp32-onnxruntime-{FULL_IMAGES}"]["output"]
    report["quality"] = {precision: feature_agreement(reference, runs[f"{DEFAULT_MODEL}-{precision}-auto-{FULL_IMAGES}"]
                                                      ["output"])
                         for precision in precisions if precision != "fp32"}
    report["machine"]["load_average_end"] = os.getloadavg()
    _save(report, args.out)
    summary(report, startup)
    return 0


def best_ceiling(rows: list[dict], precision: str) -> float:
    """The fastest inference-only rate any runtime and layout reached for `precision` on this machine."""
    return max(row["images_per_s"] for row in rows if row["precision"] == precision)


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


def summary(report: dict, startup: EndToEnd) -> None:
    runs = report["runs"]
    print("\n== summary: end to end on the FULL set against the best ceiling of its precision")
    shown = set()
    for label, run in runs.items():
        if not label.endswith(f"-{FULL_IMAGES}") or label.startswith("mobilenet") or run["output"] in shown:
            continue
        shown.add(run["output"])
        top = best_ceiling(report["ceilings"], run["precision"])
        total = run["seconds"]["total"]
        print(f"  {label}: {run['images_per_second']:.1f} img/s = {run['images_per_second'] / top:.0%} of "
              f"{top:.1f} img/s; {total / 60:.1f} min; PCA fit {run['seconds']['pca_fit'] / total:.1%}; "
              f"peak RSS {_gb(run['peak_rss_bytes'])}; runtime {run['runtime']}")
    auto_run = runs[f"{DEFAULT_MODEL}-fp32-auto-{FULL_IMAGES}"]
    ort_run = runs[f"{DEFAULT_MODEL}-fp32-onnxruntime-{FULL_IMAGES}"]
    print(f"  auto vs ONNX Runtime fp32: x{auto_run['images_per_second'] / ort_run['images_per_second']:.2f}; "
          f"vs the original study ({ORIGINAL_STUDY_IMAGES_PER_S} img/s): "
          f"x{auto_run['images_per_second'] / ORIGINAL_STUDY_IMAGES_PER_S:.1f}")
    print(f"  mini (300 images): {report['mini_wall_s']:.1f} s wall (target <= 8 s); the demo (600 images): "
          f"{report['demo_wall_s']:.1f} s wall (target <= 15 s); a {startup.images}-image run: "
          f"{startup.seconds['total']:.1f} s")
    for size, rate in report["scaling"].items():
        print(f"  {size:>6} images: {rate['end_to_end']:6.1f} img/s end to end, {rate['after_startup']:6.1f} img/s "
              f"after start-up, extraction stage {rate['extract_stage']:6.1f} img/s")
    for precision, q in report["quality"].items():
        knn = (f"; 5-NN accuracy {q['knn5_accuracy_reference']:.4f} vs {q['knn5_accuracy_other']:.4f}"
               if "knn5_accuracy_reference" in q else "")
        print(f"  {precision} (auto) vs ONNX Runtime fp32 features: cosine mean {q['cosine_mean']:.5f}, "
              f"1st percentile {q['cosine_p01']:.5f}, max |diff| {q['max_abs_diff']:.2e}{knn}")


def _save(report: dict, out: Path) -> None:
    path = out / ("results-quick.json" if report.get("quick") else "results.json")
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nresults written to {path}")


if __name__ == "__main__":
    sys.exit(main())
