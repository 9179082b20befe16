"""The only orchestrator: list -> plan shards -> extract -> PCA fit -> project -> outputs + manifest; the stages' tasks
run on the run's engine (fruitpipe.distributors: Spark, or a local process pool for a small run).

The driver lists only the source's top levels and holds per-shard records: class folders are listed, the selection
taken and the shard plan written by tasks (fruitpipe.planning), and each shard task reads its own rows. So the
driver's memory does not grow with the number of images.

A run folder is resumable: shards whose stats file exists and agrees with their plan are done and skipped; a run
folder made with a different configuration is refused rather than mixed; `overwrite` starts afresh. It also grows:
the same command after photos were added to or removed from the source plans the new images into new shards,
rewrites the shards that lost images from their stored parts, refits the PCA from every shard's stored statistics
and re-projects; the selection (--limit, --per-class, --mode mini) is the one the command computes on the grown
source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import yaml

from fruitpipe import runtimes, sinks, stages
from fruitpipe.config import LOCAL_ENGINE, SPARK_ENGINE, RunConfig
from fruitpipe.dataset import UnlistedFile, selected_parts, source_layout
from fruitpipe.distributors import choose_engine, engine_before_listing, for_pca, open_distributor
from fruitpipe.distributors import prepare as prepare_engine
from fruitpipe.errors import FruitpipeError
from fruitpipe.extract import PHASES, ExtractionSettings
from fruitpipe.extras import MissingExtra
from fruitpipe.images import RESIZE_METHOD
from fruitpipe.models.artifact import ModelArtifact, build_artifact, load_artifact
from fruitpipe.pca import PcaModel, fit, model_json, variance_rows
from fruitpipe.planning import plan_run
from fruitpipe.progress import ExtractionProgress
from fruitpipe.records import ShardPlan, ShardStats
from fruitpipe.run_folder import (
    ERRORS,
    PCA,
    RunFolder,
    RunResult,
    csv_tables,
    refuse_nested,
)
from fruitpipe.storage import unavailable_reported
from fruitpipe.version import __version__

# What `run` tells a user whose machine cannot export a model (no torch: an executor or EMR node).
USE_AN_ARTIFACT = "pass --model-file ARTIFACT made by `fruitpipe export-model`"
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RunConfig)}

def run(config: RunConfig) -> RunResult:
    """Run the whole pipeline for `config` and return what it produced."""
    config.validate()
    refuse_nested(config.source, config.output)
    started = time.perf_counter()
    prepare_engine(config)
    artifact, onnx = load_artifact(config.model_file) if config.model_file else _export_for_run(config)
    config = _decided_by(artifact, config)
    with RunFolder(config.output) as folder:
        return _execute(config, artifact, onnx, None, started, {"model_export": time.perf_counter() - started},
                        folder)


def transform(run_dir: str, config: RunConfig) -> RunResult:
    """Features + PCA for new images with a finished run's model and fitted PCA (no refit)."""
    started = time.perf_counter()
    refuse_nested(config.source, config.output)
    trained = RunFolder.finished(run_dir)
    artifact, onnx = trained.artifact()
    pca_model = trained.pca_model()
    computed = _computed_with(trained.model_info(), artifact)
    config = dataclasses.replace(config, model=artifact.name, image_size=artifact.input_size, **computed).validate()
    with RunFolder(config.output) as folder:
        return _execute(config, artifact, onnx, pca_model, started, {"model_export": 0.0}, folder)


def _export_for_run(config: RunConfig) -> tuple[ModelArtifact, bytes]:
    """The run's model exported here (torch: the driver extra); int8 is calibrated on the run's own selection."""
    from fruitpipe.quantize import CALIBRATION_IMAGES, calibration_images

    try:
        return build_artifact(config.model, config.weights, image_size=config.image_size,
                              precision=_model_precision(config.precision),
                              calibration_images=lambda: calibration_images(config.source, config.selection()),
                              calibration=f"{CALIBRATION_IMAGES} images of the run's selection of {config.source}",
                              cache_dir=config.cache_dir)
    except MissingExtra as exc:
        raise exc.instead(USE_AN_ARTIFACT) from None


def _model_precision(precision: str) -> str:
    """The precision of the graph a run computes in `precision` with: bf16 runs an fp32 graph in bf16."""
    return "int8" if precision == "int8" else "fp32"


def _computed_with(info: dict, artifact: ModelArtifact) -> dict[str, str]:
    """The precision and runtime a finished run computed its features with (its model_info), so new images get the
    same."""
    runtime = info.get("runtime", {}).get("runtime", "onnxruntime")
    return {"precision": info.get("precision", artifact.precision), "runtime": runtime}


def _decided_by(artifact: ModelArtifact, config: RunConfig) -> RunConfig:
    """The config with the artifact's model, precision and input size; an explicit, different value is an error.

    An fp32 artifact may run in bf16 (the run's precision stays bf16); an int8 artifact runs in int8.
    """
    if config.model_file and config.weights is not None:
        raise FruitpipeError(f"--weights has no effect with --model-file: {config.model_file} holds its weights "
                             f"({artifact.weights}); drop --weights")
    precision = config.precision if _model_precision(config.precision) == artifact.precision else artifact.precision
    decided = {"model": artifact.name, "precision": precision, "image_size": artifact.input_size}
    for name, value in decided.items():
        given = getattr(config, name)
        if config.model_file and given not in (_DEFAULTS[name], value):
            raise FruitpipeError(f"--{name.replace('_', '-')} {given} conflicts with --model-file "
                                 f"{config.model_file}, which holds {artifact.name} {artifact.precision} at "
                                 f"{artifact.input_size} px; drop --{name.replace('_', '-')}")
    return dataclasses.replace(config, **decided)


def _execute(config: RunConfig, artifact: ModelArtifact, onnx: bytes, fixed_pca: PcaModel | None, started: float,
             seconds: dict[str, float], folder: RunFolder) -> RunResult:
    phase = time.perf_counter()
    layout = source_layout(config.source, config.split)
    selection = config.selection()
    parts = selected_parts(layout, selection)  # a selection that matches no class is refused before OUT is touched
    seconds["list_top"] = time.perf_counter() - phase
    if fixed_pca is None and config.pca_variance is None:
        _check_k(config.pca_k, artifact.spec.feature_dim)
    phase = time.perf_counter()
    runtime = runtimes.choose(onnx, config.threads_per_task, config.precision, config.runtime, config.batch_size)
    seconds["choose_runtime"] = time.perf_counter() - phase
    stored = None if config.overwrite else folder.stored_plan()
    # A folder's run keeps the shard size it planned with, so the same command resumes it; a new run's comes from
    # its plan (auto's, for the selection's size).
    shard_size = config.shard_size or (None if config.overwrite else folder.stored_shard_size())

    def identity(size: int | None) -> dict[str, Any]:
        sized = dataclasses.replace(config, shard_size=size)
        fingerprint = {"fingerprint": sized.fingerprint(artifact.weights_sha256, artifact.input_size,
                                                        artifact.onnx_sha256, runtime.runtime, RESIZE_METHOD)}
        return {**(fingerprint if size else {}), "model": config.model, "source": config.source,
                "fruitpipe": __version__}

    folder.check(identity(shard_size), config.overwrite)
    engine = engine_before_listing(config)
    with unavailable_reported(), contextlib.ExitStack() as running:
        # Spark when the size cannot change the engine; else the local pool plans, and stays if auto keeps it.
        distributor = running.enter_context(open_distributor(engine, config, 0)) if engine == SPARK_ENGINE else None
        pool = running.enter_context(contextlib.ExitStack())
        planner = distributor or pool.enter_context(open_distributor(LOCAL_ENGINE, config, len(layout.parts)))
        folder.claim(identity(shard_size), replacing=config.overwrite)
        planned = plan_run(planner, folder, layout, parts, selection, shard_size, stored,
                           spread_new_images=config.shard_size is None)
        plan = planned.plan
        seconds.update(list=seconds.pop("list_top") + planned.seconds["list"], plan=planned.seconds["plan"])
        config = dataclasses.replace(config, shard_size=plan.shard_size)
        planned_identity = identity(plan.shard_size)
        fingerprint = planned_identity["fingerprint"]
        folder.record({**planned_identity, "images": planned.images, "listing_sha256": plan.digest})
        if fixed_pca is None and config.pca_variance is None:
            _check_k(config.pca_k, artifact.spec.feature_dim, planned.images)
        if distributor is None and choose_engine(config, planned.images) == LOCAL_ENGINE:
            distributor = planner
        elif distributor is None:
            pool.close()
            distributor = running.enter_context(open_distributor(SPARK_ENGINE, config, len(plan.shards)))
        finished = folder.finished_shards()
        _remove_unplanned(folder, plan, stored, finished)
        folder.write_artifact(artifact, onnx)
        folder.write_listing_errors(_listing_errors(planned.unlisted))
        settings = ExtractionSettings(source=config.source, output=config.output,
                                      preprocessing=artifact.preprocessing(), model_key=artifact.onnx_sha256,
                                      batch_size=config.batch_size, threads=config.threads_per_task,
                                      read_timeout_s=config.read_timeout_s, read_attempts=config.read_attempts,
                                      precision=config.precision, runtime=runtime.runtime)
        phase = time.perf_counter()
        done = stages.run_resume(distributor, config.output, plan, sorted(finished & set(plan.shards)))
        pending = sorted(set(plan.shards) - set(done))
        with ExtractionProgress(config.output, {i: shard.images for i, shard in plan.shards.items()}, set(done),
                                config.quiet):
            extracted = stages.run_extraction(distributor, plan, pending, settings, onnx)
        seconds["extract"] = time.perf_counter() - phase

        stats = sorted([*done.values(), *extracted], key=lambda shard: shard.shard_id)
        images_ok = sum(s.ok for s in stats)
        pca_distributor = for_pca(distributor, images_ok)
        phase = time.perf_counter()
        if fixed_pca is not None:
            model = fixed_pca
        else:
            if images_ok < 2:
                raise FruitpipeError(f"only {images_ok} of {planned.images} images could be processed; "
                                     f"see {folder.uri(ERRORS)}")
            generations = {shard_id: shard.generation for shard_id, shard in plan.shards.items()}
            statistics = stages.run_gram(pca_distributor, config.output, [s for s in stats if s.ok], generations)
            model = fit(statistics, k=None if config.pca_variance else config.pca_k, variance=config.pca_variance)
        seconds["pca_fit"] = time.perf_counter() - phase

        phase = time.perf_counter()
        folder.clear(PCA)
        folder.clear_csv_copies()
        stages.run_projection(pca_distributor, config.output, sorted(plan.shards), model,
                              csv_tables(config.features_csv))
        seconds["pca_transform"] = time.perf_counter() - phase
        engine_info = {**distributor.info(), "pca_stages": pca_distributor.engine}

    phase = time.perf_counter()
    retryable = sum(s.retryable for s in stats)
    counts = {"images_listed": planned.images + len(planned.unlisted), "images_ok": images_ok,
              "images_failed": sum(s.failed for s in stats) - retryable + len(planned.unlisted),
              "images_retryable": retryable}
    _write_pca_model(folder, model, artifact)
    csv_copies = folder.write_csv_copies(csv_tables(config.features_csv),
                                         merge=config.merges_csv(counts["images_listed"]))
    seconds["write_outputs"] = time.perf_counter() - phase
    seconds["total"] = time.perf_counter() - started
    executors = sorted({str(s.executor["executor_id"]) for s in stats})
    result = RunResult(output=config.output, shards_total=len(plan.shards), shards_resumed=len(done),
                       pca_k=model.k, variance_kept=model.variance_kept, seconds=seconds,
                       model=artifact.name, feature_dim=int(model.mean.shape[0]), executors=executors,
                       spark_master=engine_info.get("master", ""), hidden_files_skipped=planned.hidden_files,
                       **counts)
    _commit(folder, config, artifact, model, result, stats, fingerprint, runtime, engine_info, plan.generations,
            listing_errors=len(planned.unlisted), csv_copies=csv_copies)
    return result


def _check_k(k: int | None, feature_dim: int, image_count: int | None = None) -> None:
    if k is not None and k > feature_dim:
        raise FruitpipeError(f"--pca-k {k} is larger than the feature dimension {feature_dim}")
    if k is not None and image_count is not None and k > image_count:
        raise FruitpipeError(f"--pca-k {k} is larger than the number of selected images ({image_count})")


def _remove_unplanned(folder: RunFolder, plan: ShardPlan, stored: ShardPlan | None, finished: set[int]) -> None:
    """Delete the shards the plan does not hold: all of whose images left the source, and those of a folder
    planned afresh (an older plan format) beyond the new plan. Shards that lost some images are rewritten by
    their resume tasks (`RunFolder.resume_shard`). `finished`: the shards with a stats file."""
    earlier = finished | (set(stored.shards) if stored is not None else set())
    for shard_id in sorted(earlier - set(plan.shards)):
        folder.remove_shard(shard_id)


def _listing_errors(unlisted: list[UnlistedFile]) -> pa.Table:
    rows = [{"image_id": "", "path": file.path, "label": file.label, "stage": "list", "reason": file.reason,
             "retryable": False} for file in unlisted]
    return pa.Table.from_pylist(rows, schema=sinks.ERRORS_SCHEMA)


def _write_pca_model(folder: RunFolder, model: PcaModel, artifact: ModelArtifact) -> None:
    extra = {"feature_model": artifact.name, "weights_sha256": artifact.weights_sha256,
             "input_size": artifact.input_size, "onnx_sha256": artifact.onnx_sha256}
    folder.write_pca_model(model, model_json(model, extra), pa.Table.from_pylist(variance_rows(model)))


def versions() -> dict[str, str]:
    """Versions of what produced the numbers, for model_info and the report."""
    import pyspark

    return {"fruitpipe": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "pandas": pd.__version__, "pyarrow": pa.__version__, **runtimes.runtime_versions(),
            "pyspark": pyspark.__version__, "platform": platform.platform()}


def _commit(folder: RunFolder, config: RunConfig, artifact: ModelArtifact, model: PcaModel, result: RunResult,
            stats: list[ShardStats], fingerprint: str, runtime: runtimes.Choice, engine: dict,
            generations: list[dict], listing_errors: int, csv_copies: list[str]) -> None:
    """model_info, resolved config and, last, the manifest that lists every output and its row count, summed from
    the shards' stats and the listing's `listing_errors` rows (committed through `folder`, which checks that this
    run still holds OUT)."""
    spec = artifact.spec
    counts = {"images_listed": result.images_listed, "images_ok": result.images_ok,
              "images_failed": result.images_failed, "images_retryable": result.images_retryable}
    shard_seconds = {phase: sum(s.seconds.get(phase, 0.0) for s in stats) for phase in PHASES}
    model_info = {
        "model": spec.name, "precision": config.precision, "model_precision": artifact.precision,
        "runtime": dataclasses.asdict(runtime), "weights": artifact.weights,
        "weights_sha256": artifact.weights_sha256, "onnx_sha256": artifact.onnx_sha256,
        "model_file": config.model_file, "image_size": artifact.input_size, "interpolation": spec.interpolation,
        "resize": RESIZE_METHOD, "mean": list(spec.mean), "std": list(spec.std), "feature_dim": result.feature_dim,
        "pca_k": model.k, "variance_kept": model.variance_kept, "counts": counts, "seconds": result.seconds,
        "shard_seconds_summed": shard_seconds, "images_per_second": result.images_per_second,
        "executors": result.executors, "engine": engine, "spark_master": result.spark_master,
        "versions": versions(),
    }
    manifest = {
        "fruitpipe": __version__, "fingerprint": fingerprint, "created_unix": time.time(),
        "source": config.source, "split": config.split, "model": spec.name, "pca_k": model.k,
        **counts, "hidden_files_skipped": result.hidden_files_skipped, "shards": result.shards_total, "shards_resumed": result.shards_resumed,
        "generations": generations,
        "outputs": folder.outputs_of(stats, listing_errors), "documents": folder.documents(csv_copies),
        "python": sys.version.split()[0],
    }
    folder.commit(manifest, model_info, yaml.safe_dump(config.to_public_dict(), sort_keys=True))
