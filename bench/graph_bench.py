#!/usr/bin/env python
"""Why one ONNX graph of EfficientNet-Lite0 runs slower than another on ONNX Runtime: each candidate cause alone.

Variants of the same network with the same weights, exported side by side into a temporary folder:
  plain             a plain torch.onnx export of efficientnet_lite_pytorch (pip package of the same name) with the
                    bundled weights, `extract_features(x).mean((2, 3))`: the reference of issue 10
  before            fruitpipe's graph before issue 10: its asymmetric Pads carry no constant_value input
  fruitpipe         fruitpipe's export as it is now (models/export.py): uint8 pixels in, normalised in the graph
  float-input       fruitpipe's network taking normalised float tensors (its export before issue 10 part 4)
  features-only     fruitpipe's network without the logits branch
  opset-20          fruitpipe's network exported at opset 20 (the plain export's default)

Each variant's ONNX Runtime session (the pipeline's options, runtimes.py) runs the same random images (as uint8
pixels or as the float tensors they normalise to, whichever the variant takes); all
variants run in every round, in turn (starting one further each round), in `--processes` processes at once
(2 x 1 thread is the pipeline's layout), so a busy shared machine slows them alike: compare the ratios, not
the absolute figures. Also printed: the Pad nodes left after ONNX Runtime's graph optimisation and the largest
feature difference to the plain export.

    python bench/graph_bench.py                       # 2 processes x 1 thread, batch 2, 5 rounds x 2 s
    python bench/graph_bench.py --processes 1 --threads 2

With --preprocessing, where an image's CPU goes instead (one thread, CPU seconds, best of --rounds passes over
demo images of Fruits-360's 100 x 100): per phase outside inference (read, decode, the format name, resize,
normalise, batch stacking) and inference per image on each runtime, for the graph taking float tensors (before
issue 10 part 4), fruitpipe's graph taking pixels (after), and a candidate that resizes in the graph too (ONNX
Resize, linear half_pixel, then Round: the executor only crops), with each one's largest feature difference to
the float path.

    python bench/graph_bench.py --preprocessing       # about a minute
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fruitpipe.config import DEFAULT_CACHE_DIR  # noqa: E402
from fruitpipe.images import normalise  # noqa: E402
from fruitpipe.inference import create_session  # noqa: E402
from fruitpipe.models.specs import ONNX_FEATURES as FEATURES_OUTPUT  # noqa: E402
from fruitpipe.models.specs import ONNX_INPUT as INPUT_NAME  # noqa: E402
from fruitpipe.models.specs import ONNX_PIXELS as PIXELS_NAME  # noqa: E402
from fruitpipe.models.specs import get_spec  # noqa: E402

MODEL = "efficientnet_lite0"
SIZE = 224


def _export(module, path: Path, outputs: list[str], opset: int) -> None:
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(1, 3, SIZE, SIZE),), path, dynamo=False, input_names=[INPUT_NAME],
                          output_names=outputs, dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *outputs)},
                          opset_version=opset)


def export_variants(folder: Path) -> dict[str, Path]:
    """Every variant's ONNX file in `folder`; `plain` only where efficientnet_lite_pytorch is installed."""
    import torch
    import torch.nn.functional as F

    from fruitpipe.models import build_model, export_onnx, resolve_weights
    from fruitpipe.models.efficientnet_lite import SameConv2d
    from fruitpipe.models.export import OPSET, OUTPUT_NAMES

    spec = get_spec(MODEL)
    weights = resolve_weights(spec, None, DEFAULT_CACHE_DIR)[0]
    network = build_model(spec, weights, SIZE)
    paths = {"fruitpipe": Path(export_onnx(spec, None, DEFAULT_CACHE_DIR, SIZE).path)}

    class FeaturesOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.network(x)[0]

    paths["float-input"] = folder / "float-input.onnx"
    _export(network, paths["float-input"], list(OUTPUT_NAMES), OPSET)
    paths["features-only"] = folder / "features-only.onnx"
    _export(FeaturesOnly(), paths["features-only"], [FEATURES_OUTPUT], OPSET)
    paths["opset-20"] = folder / "opset-20.onnx"
    _export(network, paths["opset-20"], list(OUTPUT_NAMES), 20)

    fixed_forward = SameConv2d.forward

    def forward_before(self: SameConv2d, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric_pad is not None:
            x = F.pad(x, self.asymmetric_pad)
        return torch.nn.Conv2d.forward(self, x)

    SameConv2d.forward = forward_before
    try:
        paths["before"] = folder / "before.onnx"
        _export(network, paths["before"], list(OUTPUT_NAMES), OPSET)
    finally:
        SameConv2d.forward = fixed_forward

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ModuleNotFoundError:
        print("plain: skipped (pip install efficientnet_lite_pytorch to compare with the plain export)")
    else:
        reference = EfficientNet.from_pretrained(MODEL.replace("_", "-"), weights_path=weights).eval()

        class Plain(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.reference = reference

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.reference.extract_features(x).mean((2, 3))

        paths["plain"] = folder / "plain.onnx"
        _export(Plain(), paths["plain"], [FEATURES_OUTPUT], 20)
    return paths


def optimised_pads(path: Path, folder: Path) -> int:
    """Pad nodes left in the graph ONNX Runtime runs (after its optimisations, e.g. Pad+Conv fusion)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / f"{path.stem}.optimised.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sum(node.op_type == "Pad" for node in onnx.load(options.optimized_model_filepath).graph.node)


def random_inputs(batch_size: int) -> dict[str, np.ndarray]:
    """The same random images as each graph input takes them: uint8 pixels, and the float tensors they give."""
    pixels = np.random.default_rng(0).integers(0, 256, (batch_size, SIZE, SIZE, 3), dtype=np.uint8)
    prep = get_spec(MODEL).preprocessing(SIZE)
    return {PIXELS_NAME: pixels, INPUT_NAME: np.stack([normalise(image, prep) for image in pixels])}


def _worker(paths: dict[str, str], threads: int, inputs: dict[str, np.ndarray], rounds: int, seconds: float,
            barrier, results) -> None:
    sessions = {name: create_session(Path(path).read_bytes(), threads) for name, path in paths.items()}
    for session in sessions.values():
        session.run(inputs[session.input_name])
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    names = list(sessions)
    for round_ in range(rounds):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            session, batch = sessions[name], inputs[sessions[name].input_name]
            barrier.wait()
            started, done = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                session.run(batch)
                done += len(batch)
            rates[name].append(done / (time.perf_counter() - started))
    results.put(rates)


def measure(paths: dict[str, Path], processes: int, threads: int, inputs: dict[str, np.ndarray], rounds: int,
            seconds: float) -> dict[str, list[float]]:
    """Images/s per variant and round, summed over the processes (which run the same variant at once)."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    as_text = {name: str(path) for name, path in paths.items()}
    workers = [context.Process(target=_worker, args=(as_text, threads, inputs, rounds, seconds, barrier, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    per_process = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    return {name: [sum(rates[name][i] for rates in per_process) for i in range(rounds)] for name in paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--preprocessing", action="store_true", help="per-phase CPU per image instead")
    args = parser.parse_args()
    if args.preprocessing:
        print(f"cpu: {_cpu_model()}, {os.cpu_count()} cores")
        preprocessing_phases(args.batch, args.rounds)
        return
    inputs = random_inputs(args.batch)
    print(f"cpu: {_cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{args.processes} processes x {args.threads} threads, batch {args.batch}, "
          f"{args.rounds} rounds x {args.seconds:g} s per variant")
    with tempfile.TemporaryDirectory(prefix="fruitpipe-graphs-") as work:
        folder = Path(work)
        paths = export_variants(folder)
        sessions = {name: create_session(path.read_bytes(), 1) for name, path in paths.items()}
        features = {name: session.run(inputs[session.input_name]) for name, session in sessions.items()}
        pads = {name: optimised_pads(path, folder) for name, path in paths.items()}
        rates = measure(paths, args.processes, args.threads, inputs, args.rounds, args.seconds)
    reference = "plain" if "plain" in paths else "before"
    base = float(np.median(rates[reference]))
    print(f"{'variant':<15} {'img/s':>7} {'vs ' + reference:>9} {'Pads left':>9} {'max |diff|':>10}  rounds")
    for name in paths:
        median = float(np.median(rates[name]))
        diff = float(np.abs(features[name] - features[reference]).max())
        print(f"{name:<15} {median:7.1f} {median / base:8.2f}x {pads[name]:9d} {diff:10.1e}  "
              + " ".join(f"{rate:.0f}" for rate in rates[name]))


def _resizing_graph(folder: Path) -> Path:
    """The network behind uint8 [N, 100, 100, 3] pixels, resized in the graph (linear, half_pixel, each pixel
    rounded as PIL rounds to uint8) and normalised: the candidate that leaves the executor only the crop."""
    import torch
    import torch.nn.functional as F

    from fruitpipe.models import build_model, get_spec, resolve_weights

    spec = get_spec(MODEL)
    network = build_model(spec, resolve_weights(spec, None, DEFAULT_CACHE_DIR)[0], SIZE)
    scale, shift = (torch.from_numpy(value) for value in spec.preprocessing(SIZE).scale_and_shift())

    class ResizingInput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = F.interpolate(pixels.permute(0, 3, 1, 2).float(), size=(SIZE, SIZE), mode="bilinear",
                              align_corners=False)
            return self.network(torch.round(x) * scale + shift)

    path = folder / "resize-in-graph.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(ResizingInput().eval(), (torch.zeros(1, 100, 100, 3, dtype=torch.uint8),), path,
                          dynamo=False, input_names=[PIXELS_NAME], output_names=[FEATURES_OUTPUT, "logits"],
                          dynamic_axes={PIXELS_NAME: {0: "batch"}}, opset_version=17)
    return path


def _cpu_us(function, items: list, rounds: int) -> float:
    """Best CPU microseconds per item of `function` over all items, in this thread and any it starts."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for item in items:
            function(item)
        best = min(best, (time.process_time() - started) / len(items) * 1e6)
    return best


def preprocessing_phases(batch_size: int, rounds: int) -> None:
    """Per-image CPU per phase and inference for the float path, the pixels path and the resize-in-graph path."""
    from fruitpipe import runtimes
    from fruitpipe.demo_data import generate_demo_dataset
    from fruitpipe.images import decode_rgb, image_format, image_size, square_pixels
    from fruitpipe.models import build_model, export_onnx, resolve_weights

    spec = get_spec(MODEL)
    prep = spec.preprocessing(SIZE)
    with tempfile.TemporaryDirectory(prefix="fruitpipe-phases-") as work:
        folder = Path(work)
        generate_demo_dataset(str(folder / "demo"), classes=8, per_class=16, seed=0, test_per_class=1)
        files = sorted((folder / "demo").glob("Training/*/*.jpg"))
        network = build_model(spec, resolve_weights(spec, None, DEFAULT_CACHE_DIR)[0], SIZE)
        graphs = {"float": folder / "float-input.onnx", "pixels": Path(export_onnx(spec, None, DEFAULT_CACHE_DIR).path),
                  "resize in graph": _resizing_graph(folder)}
        _export(network, graphs["float"], [FEATURES_OUTPUT, "logits"], 17)
        blobs = [path.read_bytes() for path in files]
        images = [decode_rgb(data, SIZE)[0] for data in blobs]
        squares = [square_pixels(image, prep) for image in images]
        crops = [np.asarray(image) for image in images]  # Fruits-360 images are square: the crop is the image
        tensors = [normalise(pixels, prep) for pixels in squares]
        inputs = {"float": tensors, "pixels": squares, "resize in graph": crops}
        groups = range(0, len(files) - batch_size + 1, batch_size)
        host = {
            "read": _cpu_us(Path.read_bytes, files, rounds),
            "decode": _cpu_us(lambda data: decode_rgb(data, SIZE), blobs, rounds),
            "format: PIL opens again": _cpu_us(image_size, blobs, rounds),
            "format: JPEG's first bytes": _cpu_us(image_format, blobs, rounds),
            "resize (PIL, before)": _cpu_us(lambda image: np.asarray(image.resize((SIZE, SIZE), Image.BILINEAR)),
                                            images, rounds),
            "resize (host, now)": _cpu_us(lambda image: square_pixels(image, prep), images, rounds),
            "normalise": _cpu_us(lambda pixels: normalise(pixels, prep), squares, rounds),
        }
        stack = {kind: _cpu_us(lambda i, kind=kind: np.stack(inputs[kind][i:i + batch_size]), list(groups), rounds)
                 / batch_size for kind in graphs}
        phases = {"float": ["read", "decode", "format: PIL opens again", "resize (PIL, before)", "normalise"],
                  "pixels": ["read", "decode", "format: JPEG's first bytes", "resize (host, now)"],
                  "resize in graph": ["read", "decode", "format: JPEG's first bytes"]}
        batches = {kind: [np.stack(inputs[kind][i:i + batch_size]) for i in groups] for kind in graphs}
        loaded = {(kind, name): runtimes.load(path.read_bytes(), 1, "fp32", name)
                  for kind, path in graphs.items() for name in runtimes.RUNTIMES}
        features = {key: np.concatenate([runtime.run(batch) for batch in batches[key[0]]])
                    for key, runtime in loaded.items()}
        # Rounds alternate between the graphs, so a busy machine slows them alike.
        infer = dict.fromkeys(loaded, float("inf"))
        for _ in range(rounds):
            for key, runtime in loaded.items():
                infer[key] = min(infer[key], _cpu_us(runtime.run, batches[key[0]], 1) / batch_size)
    kinds = list(graphs)
    print(f"\n== CPU us per image, one thread, {len(files)} demo images (100 x 100 JPEG), batch {batch_size}, "
          f"best of {rounds}; load {os.getloadavg()[0]:.1f}")
    print(f"{'phase':<28}" + "".join(f"{kind:>17}" for kind in kinds))
    for phase in host:
        print(f"{phase:<28}" + "".join(f"{host[phase]:17.0f}" if phase in phases[kind] else f"{'-':>17}"
                                       for kind in kinds))
    print(f"{'stack the batch':<28}" + "".join(f"{stack[kind]:17.0f}" for kind in kinds))
    outside = {kind: sum(host[phase] for phase in phases[kind]) + stack[kind] for kind in kinds}
    print(f"{'= outside inference':<28}" + "".join(f"{outside[kind]:17.0f}" for kind in kinds))
    for name in runtimes.RUNTIMES:
        print(f"{'inference, ' + name:<28}" + "".join(f"{infer[kind, name]:17.0f}" for kind in kinds))
        print(f"{'= total, ' + name:<28}" + "".join(f"{outside[kind] + infer[kind, name]:17.0f}" for kind in kinds))
        print(f"{'max |diff| to float, ' + name:<28}" + "".join(
            f"{np.abs(features[kind, name] - features['float', name]).max():17.1e}" for kind in kinds))


def _cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")


if __name__ == "__main__":
    main()
