"""fruitpipe: pretrained-CNN features, PCA and clean outputs for folders of fruit photos, on Apache Spark.

The notebook API lives here; everything heavy (Spark, pandas, ONNX Runtime, matplotlib) is imported only when a
function needs it, so `import fruitpipe` stays light:

    import fruitpipe
    result = fruitpipe.run(source="data/demo", output="output/demo", pca_k=50)
    result.pca()                                   # pandas DataFrame
    scores = fruitpipe.evaluate_run("output/demo", "data/demo")
    fruitpipe.write_report("output/demo")          # output/demo/report/index.html
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fruitpipe.config import RunConfig
    from fruitpipe.pipeline import RunResult

__all__ = ["RunConfig", "RunResult", "__version__", "evaluate_run", "load_run", "run", "transform", "write_report"]

_LAZY_CLASSES = {"RunConfig": "fruitpipe.config", "RunResult": "fruitpipe.pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        import importlib

        return getattr(importlib.import_module(_LAZY_CLASSES[name]), name)
    raise AttributeError(f"module 'fruitpipe' has no attribute {name!r}")


def _config(config: RunConfig | None, options: dict[str, Any]) -> RunConfig:
    import dataclasses

    from fruitpipe.config import RunConfig, build_config
    from fruitpipe.errors import FruitpipeError

    if config is not None and options:
        raise FruitpipeError("pass either a RunConfig or keyword options, not both")
    known = {field.name for field in dataclasses.fields(RunConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise FruitpipeError(f"unknown option {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return config.validate() if config is not None else build_config({}, options)


def run(config: RunConfig | None = None, /, **options: Any) -> RunResult:
    """Run the pipeline from a RunConfig or from the same options as keywords (source=, output=, pca_k=, ...)."""
    from fruitpipe.pipeline import run as run_pipeline

    return run_pipeline(_config(config, options))


def transform(run_dir: str, config: RunConfig | None = None, /, **options: Any) -> RunResult:
    """Features + PCA for new images with a finished run's model and PCA (options as for `run`)."""
    from fruitpipe.pipeline import transform as transform_pipeline

    return transform_pipeline(run_dir, _config(config, options))


def load_run(run_dir: str) -> RunResult:
    """A finished run's RunResult read back from its folder (local or s3://), loaders included."""
    from fruitpipe import sinks
    from fruitpipe.errors import FruitpipeError
    from fruitpipe.pipeline import RunResult
    from fruitpipe.run_folder import require_finished

    out = require_finished(run_dir)
    try:
        manifest = sinks.read_json(out, sinks.MANIFEST)
        info = sinks.read_json(out, f"{sinks.MODEL_INFO}/model_info.json")
    except FileNotFoundError:
        raise FruitpipeError(f"{run_dir} is not a finished fruitpipe run (no manifest.json or model_info)") from None
    return RunResult(output=run_dir, images_listed=manifest["images_listed"], images_ok=manifest["images_ok"],
                     images_failed=manifest["images_failed"], shards_total=manifest["shards"],
                     shards_resumed=manifest["shards_resumed"], pca_k=manifest["pca_k"],
                     variance_kept=info["variance_kept"], seconds=info["seconds"], model=manifest["model"],
                     feature_dim=info["feature_dim"], executors=info["executors"],
                     spark_master=info.get("spark_master", ""))


def evaluate_run(run_dir: str, test_source: str, /, **options: Any) -> dict:
    """k-NN and nearest-centroid accuracy of a run's features on held-out images (see fruitpipe.evaluate).

    Options are those of `run`; by default the Test split of `test_source` is extracted into
    RUN_DIR/evaluation/test_run and the scores are written to RUN_DIR/evaluation/evaluation.json.
    """
    from fruitpipe.evaluate import default_work_dir, evaluate

    defaults = {"split": "Test", "output": default_work_dir(run_dir)}
    return evaluate(run_dir, _config(None, {**defaults, **options, "source": test_source}))


def write_report(run_dir: str) -> str:
    """Write RUN_DIR/report/index.html (figures inlined) and return its URI."""
    from fruitpipe.report import build_report

    return build_report(run_dir)
