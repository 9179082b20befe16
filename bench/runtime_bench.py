#!/usr/bin/env python
"""Which runtime and precision is fastest on this CPU, how close each stays to ONNX Runtime fp32, and what auto picks.

1. Inference-only ceilings of EfficientNet-Lite0 (224 px, real weights, random input) for each runtime x
   precision (ONNX Runtime fp32/int8, OpenVINO fp32/bf16/int8) in two layouts: 2 processes x 1 thread (tasks
   sharing the node: OpenVINO unpinned) and 1 process x 2 threads (one task has the node: pinned). Within a
   layout every configuration runs in every round, in turn, all processes on the same one at once, so a busy
   shared machine slows them alike: compare ratios within a layout, not absolute figures.
2. Quality against ONNX Runtime fp32: cosine of each image's features (mean, 1st percentile) on a demo set,
   leave-one-out 1-NN accuracy (cosine) on those features, and scikit-image's chelsea / coffee ImageNet top-1.
3. auto's choice per precision for the pipeline's layout (1 thread, batch 2), probed into a fresh cache.

    python bench/runtime_bench.py                     # about 2-3 minutes on 2 cores
    python bench/runtime_bench.py --rounds 5 --seconds 2
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fruitpipe import runtimes  # noqa: E402
from fruitpipe.config import DEFAULT_CACHE_DIR  # noqa: E402

MODEL = "efficientnet_lite0"
DEMO = REPO / "data" / "bench-runtimes"
DEMO_CLASSES, DEMO_PER_CLASS = 20, 15
# (runtime, precision): which model file each precision runs (int8: the QDQ model) is decided in models().
CONFIGS = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"), ("onnxruntime", "int8"),
           ("openvino", "int8"))
LAYOUTS = ((2, 1, 2), (1, 2, 8))  # (processes, threads each, batch)


def models() -> tuple[dict[str, bytes], object]:
    """fp32 and int8 ONNX bytes (int8 calibrated on 64 demo images, as a run would) and the preprocessing."""
    from fruitpipe.demo_data import generate_demo_dataset
    from fruitpipe.models import export_onnx, get_spec
    from fruitpipe.quantize import calibration_sample, quantize_int8

    if not (DEMO / "Training").is_dir():
        generate_demo_dataset(str(DEMO), classes=DEMO_CLASSES, per_class=DEMO_PER_CLASS, seed=0, test_per_class=1)
    spec = get_spec(MODEL)
    exported = export_onnx(spec, None, DEFAULT_CACHE_DIR)
    prep = spec.preprocessing(exported.input_size)
    paths = sorted(str(p.relative_to(DEMO)) for p in DEMO.glob("Training/*/*.jpg"))
    int8_path, _ = quantize_int8(exported.path, exported.onnx_sha256, prep, calibration_sample(str(DEMO), paths),
                                 DEFAULT_CACHE_DIR)
    return {"fp32": Path(exported.path).read_bytes(), "int8": Path(int8_path).read_bytes()}, prep


def _model_for(files: dict[str, bytes], precision: str) -> bytes:
    return files["int8" if precision == "int8" else "fp32"]


def _supported(runtime: str, precision: str) -> str | None:
    """Why a configuration cannot run here, or None."""
    if runtime == "onnxruntime" and precision == "bf16":
        return "no bf16 path"
    if runtime == "openvino" and precision == "bf16" and not runtimes.has_native_bf16():
        return "no bf16 instructions"
    return None


def _worker(files: dict[str, bytes], configs: list[tuple[str, str]], threads: int, tasks: int, batch: np.ndarray,
            rounds: int, seconds: float, barrier, results) -> None:
    loaded = {config: runtimes.load(_model_for(files, config[1]), threads, config[1], config[0],
                                    tasks_per_node=tasks) for config in configs}
    for runtime in loaded.values():
        runtime.run(batch)
    rates: dict[tuple[str, str], list[float]] = {config: [] for config in configs}
    for round_ in range(rounds):
        for config in configs[round_ % len(configs):] + configs[:round_ % len(configs)]:
            barrier.wait()
            started, done = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                loaded[config].run(batch)
                done += len(batch)
            rates[config].append(done / (time.perf_counter() - started))
    results.put(rates)


def ceilings(files: dict[str, bytes], configs: list[tuple[str, str]], processes: int, threads: int, batch_size: int,
             rounds: int, seconds: float) -> dict[tuple[str, str], list[float]]:
    """Images/s per configuration and round, summed over the processes."""
    batch = np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)  # the graph's pixels
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_worker, args=(files, configs, threads, processes, batch, rounds, seconds,
                                                     barrier, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    per_process = [results.get(timeout=900) for _ in workers]
    for worker in workers:
        worker.join()
    return {c: [sum(r[c][i] for r in per_process) for i in range(rounds)] for c in configs}


def quality(files: dict[str, bytes], prep, configs: list[tuple[str, str]]) -> None:
    """Cosine to ONNX Runtime fp32, 1-NN accuracy and chelsea/coffee top-1 per configuration."""
    import skimage.data
    import torch
    from PIL import Image

    from fruitpipe.images import model_pixels
    from fruitpipe.models import build_model, get_spec, imagenet_classes, resolve_weights

    paths = sorted(DEMO.glob("Training/*/*.jpg"))
    labels = np.array([p.parent.name for p in paths])
    demo = np.stack([model_pixels(p.read_bytes(), prep)[0] for p in paths])
    photos = []
    for array, fmt in ((skimage.data.chelsea(), "PNG"), (skimage.data.coffee(), "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, fmt)
        photos.append(model_pixels(buffer.getvalue(), prep)[0])
    spec = get_spec(MODEL)
    fc = build_model(spec, resolve_weights(spec, None, DEFAULT_CACHE_DIR)[0])._fc
    names = imagenet_classes()
    reference = None
    print(f"\n== quality on {len(paths)} demo images ({DEMO_CLASSES} classes) and chelsea/coffee, vs onnxruntime fp32")
    print(f"{'runtime':<12} {'precision':<9} {'cos mean':>9} {'cos p1':>8} {'max |diff|':>10} {'1-NN':>6}  top-1")
    for runtime_name, precision in configs:
        runtime = runtimes.load(_model_for(files, precision), 2, precision, runtime_name, tasks_per_node=1)
        features = np.concatenate([runtime.run(demo[i:i + 8]) for i in range(0, len(demo), 8)])
        pictured = runtime.run(np.stack(photos))
        if reference is None:
            reference = features
        cosine = (features * reference).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1))
        unit = features / np.linalg.norm(features, axis=1, keepdims=True)
        similarity = unit @ unit.T
        np.fill_diagonal(similarity, -np.inf)
        accuracy = float((labels[similarity.argmax(1)] == labels).mean())
        with torch.no_grad():
            top1 = fc(torch.from_numpy(pictured)).argmax(1).tolist()
        print(f"{runtime_name:<12} {precision:<9} {cosine.mean():9.5f} {np.percentile(cosine, 1):8.5f} "
              f"{np.abs(features - reference).max():10.1e} {accuracy:6.1%}  {', '.join(names[i] for i in top1)}")


def auto_choices(files: dict[str, bytes]) -> None:
    """What auto picks for the pipeline's layout (1 thread per task, batch 2) on this CPU, from a fresh probe."""
    print("\n== auto (1 thread, batch 2, fresh probe cache)")
    with tempfile.TemporaryDirectory(prefix="fruitpipe-probe-") as cache:
        for precision in runtimes.PRECISIONS:
            try:
                runtime = runtimes.load(_model_for(files, precision), 1, precision, "auto", cache_dir=cache)
            except Exception as exc:  # a precision this machine cannot run: say why and go on
                print(f"{precision:<5} -> not available: {exc}")
                continue
            print(f"{precision:<5} -> {runtime.name} ({runtime.choice.reason}; img/s {runtime.choice.images_per_s})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    flags = sorted(f for f in runtimes.cpu_flags() if f.startswith(("avx512_bf16", "avx512_vnni", "amx", "avx2")))
    print(f"cpu: {runtimes.cpu_model()}, {os.cpu_count()} cores, flags {' '.join(flags)}; "
          f"versions {runtimes.runtime_versions()}; load {os.getloadavg()[0]:.1f}")
    files, prep = models()
    configs = [c for c in CONFIGS if _supported(*c) is None]
    for skipped in sorted(set(CONFIGS) - set(configs)):
        print(f"skipped {skipped[0]} {skipped[1]}: {_supported(*skipped)}")
    for processes, threads, batch in LAYOUTS:
        rates = ceilings(files, configs, processes, threads, batch, args.rounds, args.seconds)
        base = float(np.median(rates[("onnxruntime", "fp32")]))
        print(f"\n== ceilings, {processes} process(es) x {threads} thread(s), batch {batch}, "
              f"{args.rounds} rounds x {args.seconds:g} s (median img/s; ratio to onnxruntime fp32)")
        for config, values in rates.items():
            median = float(np.median(values))
            print(f"{config[0]:<12} {config[1]:<5} {median:7.1f} {median / base:6.2f}x  "
                  + " ".join(f"{v:.0f}" for v in values))
    if not args.skip_quality:
        quality(files, prep, configs)
    auto_choices(files)


if __name__ == "__main__":
    main()
