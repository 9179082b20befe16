"""Inference runtimes behind one small interface: `load(model bytes, threads, precision) -> Runtime`, then
`Runtime.run(batch) -> features`. ONNX Runtime and OpenVINO both read the same ONNX bytes; neither needs torch.
A runtime feeds the batch to its graph's one input, whose name (`input_name`) says what the batch must be:
"pixels" [N, S, S, 3] uint8 (fruitpipe's exports) or "images" [N, 3, S, S] float32 (graphs exported before).

- onnxruntime: the CPU execution provider, sequential, idle threads sleeping (they would take CPU from the
  decode threads and the other tasks). fp32 and int8 (the QDQ model, fused into int8 kernels on load).
- openvino: the CPU plugin, one stream of `threads` threads. fp32 and int8 run with an explicit f32 precision
  hint: without it OpenVINO computes in bf16 wherever the CPU has bf16 instructions (AVX512-BF16, AMX), and a
  run's fp32 features must agree across machines within 1e-4. bf16 exists only here (ONNX Runtime has no bf16
  path) and only on a CPU with native bf16, where the plugin honours the hint. Its threads are pinned to cores
  only when one task has the node: pinned single-thread processes all take the first core.
- auto: the faster of the installed runtimes for this model, precision and thread count on this CPU, measured
  once by a short probe and cached on disk (probe_cache_path), so the choice is the same for every task on the
  node once made. auto never changes the precision.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from fruitpipe.config import AUTO_RUNTIME as AUTO
from fruitpipe.config import PRECISIONS
from fruitpipe.config import RUNTIMES as RUNTIME_CHOICES
from fruitpipe.errors import FruitpipeError
from fruitpipe.models.specs import ONNX_FEATURES, ONNX_PIXELS

ONNXRUNTIME, OPENVINO = (name for name in RUNTIME_CHOICES if name != AUTO)
RUNTIMES = (ONNXRUNTIME, OPENVINO)
# Idle intra-op threads busy-wait by default; inside a Spark task they would take CPU from the decode threads
# of the same shard and from the other tasks (measured in BENCHMARKS.md), so they sleep instead.
ALLOW_SPINNING = False
# CPU flags that give OpenVINO native bf16 arithmetic; without one it would not run bf16 at all.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# The probe: this many rounds of this many seconds per candidate, alternating, on a batch of PROBE_BATCH
# random images; the best round counts (interference from other processes only ever slows a round down).
PROBE_ROUNDS = 5
PROBE_SECONDS = 0.3
PROBE_BATCH = 2
# ONNX Runtime, the base dependency, stays the choice unless another runtime is clearly faster, so probe noise
# does not flip the choice between nodes with the same CPU (on 2 busy shared cores single rounds vary by 20 %).
PROBE_MARGIN = 1.10
PROBE_FORMAT = 1


class Runtime(Protocol):
    """A loaded model: run() maps a batch of what its input takes (see the module) to [N, D] float32 features."""

    name: str
    precision: str
    threads: int
    choice: Choice
    input_name: str
    # The square side S of the input.
    input_size: int

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def info(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Choice:
    """Which runtime runs and why: "asked" (named by the caller), "only candidate", "probe" or "cached probe"."""

    runtime: str
    reason: str
    images_per_s: dict[str, float] = field(default_factory=dict)


class OnnxRuntimeCPU:
    """ONNX Runtime's CPU execution provider with the pipeline's session options."""

    name = ONNXRUNTIME

    def __init__(self, model_bytes: bytes, threads: int, precision: str = "fp32",
                 allow_spinning: bool = ALLOW_SPINNING, choice: Choice | None = None) -> None:
        if precision == "bf16":
            raise FruitpipeError("bf16 runs only on OpenVINO (ONNX Runtime has no bf16 path on CPUs): "
                                 "use --runtime openvino or auto")
        self.precision, self.threads = precision, threads
        self.choice = choice or Choice(ONNXRUNTIME, "asked")
        self.session = ort.InferenceSession(model_bytes, sess_options=session_options(threads, allow_spinning),
                                            providers=["CPUExecutionProvider"])
        graph_input = self.session.get_inputs()[0]
        self.input_name, self.input_size = graph_input.name, _side(graph_input.name, graph_input.shape)

    def run(self, batch: np.ndarray) -> np.ndarray:
        (features,) = self.session.run([ONNX_FEATURES], {self.input_name: np.ascontiguousarray(batch)})
        return np.asarray(features, dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {"runtime": self.name, "version": ort.__version__, "precision": self.precision,
                "threads": self.threads, "choice": asdict(self.choice)}


def session_options(threads: int, allow_spinning: bool = ALLOW_SPINNING) -> ort.SessionOptions:
    """Options for one task's session: `threads` intra-op threads, sequential, fully optimised graph."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


class OpenVinoCPU:
    """OpenVINO's CPU plugin: one stream of `threads` threads, the precision as an explicit hint."""

    name = OPENVINO

    def __init__(self, model_bytes: bytes, threads: int, precision: str = "fp32", tasks_per_node: int | None = None,
                 choice: Choice | None = None) -> None:
        if precision == "bf16":
            _require_native_bf16()
        ov = _openvino(f"--runtime openvino (precision {precision})")
        self.precision, self.threads = precision, threads
        self.choice = choice or Choice(OPENVINO, "asked")
        self.pinned = tasks_per_node == 1
        model = _core().read_model(io.BytesIO(model_bytes))
        self.compiled = _core().compile_model(model, "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": self.pinned,
        })
        self.version = ov.get_version()
        self._output = self.compiled.output(ONNX_FEATURES)
        self._request = self.compiled.create_infer_request()
        graph_input = self.compiled.input(0)
        self.input_name = graph_input.get_any_name()
        self.input_size = _side(self.input_name, [dim.get_length() if dim.is_static else None
                                                  for dim in graph_input.get_partial_shape()])

    def run(self, batch: np.ndarray) -> np.ndarray:
        result = self._request.infer({0: np.ascontiguousarray(batch)}, share_inputs=True)
        return np.asarray(result[self._output], dtype=np.float32)

    def info(self) -> dict[str, Any]:
        return {"runtime": self.name, "version": self.version, "precision": self.precision, "threads": self.threads,
                "cpu_pinning": self.pinned, "choice": asdict(self.choice)}


def _openvino(purpose: str) -> Any:
    try:
        import openvino
    except ModuleNotFoundError:
        raise FruitpipeError(f"{purpose} needs openvino, which is not installed: "
                             "pip install -c requirements.lock openvino") from None
    return openvino


@cache
def _core() -> Any:
    """The process's OpenVINO Core (it holds the plugins; one per process is enough)."""
    return _openvino("OpenVINO").Core()


def load(model_bytes: bytes, threads: int, precision: str = "fp32", runtime: str = AUTO, *,
         tasks_per_node: int | None = None, cache_dir: str | None = None,
         batch_size: int = PROBE_BATCH) -> Runtime:
    """The model loaded on `runtime` ("onnxruntime", "openvino" or "auto") for one task of `threads` threads.

    tasks_per_node is how many tasks share this machine (None: assume several); it decides OpenVINO's CPU
    pinning. For auto, cache_dir holds the probe results (default: fruitpipe's cache) and batch_size is the
    batch the probe times. The returned Runtime's `name` and `choice` say what runs and why: record them.
    """
    if precision not in PRECISIONS:
        raise FruitpipeError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if runtime == AUTO:
        return _auto(model_bytes, threads, precision, tasks_per_node, cache_dir, batch_size)
    return _build(runtime, model_bytes, threads, precision, tasks_per_node, Choice(runtime, "asked"))


def choose(model_bytes: bytes, threads: int, precision: str, runtime: str, batch_size: int = PROBE_BATCH) -> Choice:
    """The runtime a run uses, decided once on the driver so its features never mix runtimes: `runtime` itself when
    named (checked to be installed and able to run `precision` here), or auto's choice on this machine's CPU.

    auto's probe results are kept in the machine's fruitpipe cache, not a run's --cache-dir: a CPU's fastest runtime
    is a fact about the machine, and every run on it then makes the same choice.
    """
    if runtime == AUTO:
        return load(model_bytes, threads, precision, AUTO, batch_size=batch_size).choice
    if runtime not in candidates(precision):
        what = "is not installed" if runtime == OPENVINO and not _openvino_installed() else f"cannot run {precision}"
        raise FruitpipeError(f"--runtime {runtime} {what} here; use --runtime auto or another --precision")
    return Choice(runtime, "asked")


def _build(runtime: str, model_bytes: bytes, threads: int, precision: str, tasks_per_node: int | None,
           choice: Choice) -> Runtime:
    """The runtime loaded; bytes it cannot load (a hand-made or damaged artifact) are one line, not its traceback."""
    kinds = {ONNXRUNTIME: OnnxRuntimeCPU, OPENVINO: OpenVinoCPU}
    if runtime not in kinds:
        raise FruitpipeError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIME_CHOICES)}")
    try:
        if runtime == OPENVINO:
            return OpenVinoCPU(model_bytes, threads, precision, tasks_per_node, choice=choice)
        return OnnxRuntimeCPU(model_bytes, threads, precision, choice=choice)
    except FruitpipeError:
        raise
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FruitpipeError(f"{runtime} cannot load the model ({len(model_bytes)} bytes): {reason}") from None


def candidates(precision: str) -> list[str]:
    """The installed runtimes that can run `precision` on this CPU, ONNX Runtime first."""
    installed = [ONNXRUNTIME] + ([OPENVINO] if _openvino_installed() else [])
    if precision != "bf16":
        return installed
    if OPENVINO not in installed:
        _openvino("--precision bf16")
    _require_native_bf16()
    return [OPENVINO]


def _openvino_installed() -> bool:
    try:
        _openvino("")
    except FruitpipeError:
        return False
    return True


def _auto(model_bytes: bytes, threads: int, precision: str, tasks_per_node: int | None, cache_dir: str | None,
          batch_size: int) -> Runtime:
    names = candidates(precision)
    if len(names) == 1:
        return _build(names[0], model_bytes, threads, precision, tasks_per_node, Choice(names[0], "only candidate"))
    path = probe_cache_path(hashlib.sha256(model_bytes).hexdigest(), precision, threads, batch_size, cache_dir)
    with _locked(path):
        cached = read_probe(path)
        if cached is not None and cached.runtime in names:
            return _build(cached.runtime, model_bytes, threads, precision, tasks_per_node, cached)
        loaded = {name: _build(name, model_bytes, threads, precision, tasks_per_node, Choice(name, "probe"))
                  for name in names}
        rates = probe(loaded, batch_size)
        fastest = max(rates, key=rates.__getitem__)
        winner = fastest if rates[fastest] > PROBE_MARGIN * rates[ONNXRUNTIME] else ONNXRUNTIME
        choice = Choice(winner, "probe", rates)
        _write_probe(path, choice, precision, threads, batch_size)
    runtime = loaded[winner]
    runtime.choice = choice
    return runtime


def probe(loaded: dict[str, Runtime], batch_size: int) -> dict[str, float]:
    """Images/s of each runtime on one random batch: the best of PROBE_ROUNDS alternating rounds."""
    batch = random_batch(next(iter(loaded.values())), batch_size)
    for runtime in loaded.values():
        runtime.run(batch)
    best = dict.fromkeys(loaded, 0.0)
    for _ in range(PROBE_ROUNDS):
        for name, runtime in loaded.items():
            started, done = time.perf_counter(), 0
            while time.perf_counter() - started < PROBE_SECONDS:
                runtime.run(batch)
                done += batch_size
            best[name] = max(best[name], done / (time.perf_counter() - started))
    return {name: round(rate, 1) for name, rate in best.items()}


def random_batch(runtime: Runtime, batch_size: int) -> np.ndarray:
    """A seeded random batch of what the runtime's graph takes: uint8 pixels or normalised float tensors."""
    rng, size = np.random.default_rng(0), runtime.input_size
    if runtime.input_name == ONNX_PIXELS:
        return rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    return rng.standard_normal((batch_size, 3, size, size)).astype(np.float32)


def _side(input_name: str, shape: list) -> int:
    """The square side of a graph input ("pixels" [N, S, S, 3] or "images" [N, 3, S, S])."""
    return int(shape[1] if input_name == ONNX_PIXELS else shape[-1])


def probe_cache_path(model_sha256: str, precision: str, threads: int, batch_size: int,
                     cache_dir: str | None = None) -> Path:
    """Where auto's probe result lives for this model and setting on this CPU with these runtime versions.

    A new CPU (model name and flags: virtual machines often name only the vendor), runtime version, model,
    precision, thread count or batch size gets a new probe.
    """
    from fruitpipe.config import DEFAULT_CACHE_DIR

    key = json.dumps([cpu_model(), sorted(cpu_flags()), runtime_versions(), precision, threads, batch_size])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cache_dir or DEFAULT_CACHE_DIR) / "runtime-probes" / f"{model_sha256[:16]}-{digest}.json"


def read_probe(path: Path) -> Choice | None:
    """The choice a probe cache file records, or None when there is none (or it is unreadable: probe again)."""
    try:
        document = json.loads(path.read_text())
        return Choice(str(document["choice"]), "cached probe",
                      {str(k): float(v) for k, v in document["images_per_s"].items()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write_probe(path: Path, choice: Choice, precision: str, threads: int, batch_size: int) -> None:
    document = {"format": PROBE_FORMAT, "choice": choice.runtime, "images_per_s": choice.images_per_s,
                "cpu": cpu_model(), "versions": runtime_versions(), "precision": precision, "threads": threads,
                "batch_size": batch_size, "probed_at": time.time()}
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(json.dumps(document, indent=2))
    os.replace(temporary, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process probes while the node's other tasks wait, then read its result: one choice per node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def runtime_versions() -> dict[str, str]:
    """The installed runtimes' versions (a probe is only valid for them)."""
    versions = {ONNXRUNTIME: ort.__version__}
    if _openvino_installed():
        versions[OPENVINO] = _openvino("").get_version()
    return versions


@cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = "", frozenset[str]()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = frozenset(value.split())
    return model or platform.processor() or platform.machine(), flags


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing)."""
    return _cpuinfo()[1]


def _require_native_bf16() -> None:
    """bf16 without the instructions would be emulated (slower than fp32) or silently run as fp32: refused."""
    if not has_native_bf16():
        raise FruitpipeError(f"--precision bf16 needs a CPU with bf16 instructions ({' or '.join(BF16_FLAGS)}); "
                             f"this one ({cpu_model()}) has none: use --precision fp32")


def has_native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16 or AMX), the only case where bf16 is offered."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)
