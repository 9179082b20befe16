"""fruitpipe: pretrained-CNN features, PCA and clean outputs for folders of fruit photos, on Apache Spark.

The notebook API lives here; everything heavy (Spark, pandas, ONNX Runtime, matplotlib) is imported only when a
function needs it, so `import fruitpipe` stays light:

    import fruitpipe
    result = fruitpipe.run(source="data/demo", output="output/demo", pca_k=50)
    result.pca()                                   # pandas DataFrame
    scores = fruitpipe.evaluate_run("output/demo", "data/demo")
    fruitpipe.write_report("output/demo")          # output/demo/report/index.html
    fruitpipe.build_index("output/demo")           # output/demo/index/ (faiss)
    fruitpipe.similar("output/demo", ["photo.jpg"], k=10)   # pandas: the nearest training images, the k-NN vote
    fruitpipe.find_duplicates("output/demo", test_run="output/demo-test")   # output/demo/duplicates/
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from fruitpipe.version import __version__

if TYPE_CHECKING:
    import pandas as pd

    from fruitpipe.config import RunConfig
    from fruitpipe.run_folder import Duplicates, RunResult

__all__ = ["RunConfig", "RunResult", "__version__", "build_index", "evaluate_run", "find_duplicates", "load_run",
           "run", "similar", "transform", "write_report"]

_LAZY_CLASSES = {"RunConfig": "fruitpipe.config", "RunResult": "fruitpipe.run_folder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_CLASSES:
        import importlib

        return getattr(importlib.import_module(_LAZY_CLASSES[name]), name)
    raise AttributeError(f"module 'fruitpipe' has no attribute {name!r}")


def _config(config: RunConfig | None, options: dict[str, Any]) -> RunConfig:
    import dataclasses

    from fruitpipe.config import RunConfig, resolve_config
    from fruitpipe.errors import FruitpipeError

    if config is not None and options:
        raise FruitpipeError("pass either a RunConfig or keyword options, not both")
    known = {field.name for field in dataclasses.fields(RunConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise FruitpipeError(f"unknown option {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return config.validate() if config is not None else resolve_config(None, options)


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
    from fruitpipe.run_folder import load_run as load

    return load(run_dir)


def evaluation_options(run_dir: str, test_source: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a held-out extraction: the Test split of `test_source` into RUN_DIR/evaluation/test_run unless
    `options` say otherwise (None is not saying), so `evaluate_run` and `fruitpipe evaluate` agree."""
    from fruitpipe.evaluate import default_work_dir

    given = {key: value for key, value in options.items() if value is not None}
    return {"split": "Test", "output": default_work_dir(run_dir), **given, "source": test_source}


def evaluate_run(run_dir: str, test: str | RunConfig, /, **options: Any) -> dict:
    """k-NN and nearest-centroid accuracy of a run's features on held-out images (see fruitpipe.evaluate).

    `test` is the held-out dataset root, with options as for `run` (see `evaluation_options` for the defaults), or
    the RunConfig of the held-out extraction itself. The scores are written to RUN_DIR/evaluation/evaluation.json.
    """
    from fruitpipe.evaluate import evaluate

    if isinstance(test, str):
        return evaluate(run_dir, _config(None, evaluation_options(run_dir, test, options)))
    return evaluate(run_dir, _config(test, options))


def write_report(run_dir: str) -> str:
    """Write RUN_DIR/report/index.html (figures inlined) and return its URI."""
    from fruitpipe.report import build_report

    return build_report(run_dir)


def build_index(run_dir: str, space: str = "pca", metric: str = "cosine", exact_below: int | None = None,
                **options: Any) -> dict:
    """Build RUN_DIR/index/ over the run's PCA vectors (or space="features"), cosine or L2 (see fruitpipe.index);
    returns the index's description (kind, count, recall@10 measured). A large run's index is built in tasks
    (options as for `transform`: master=, spark_conf=, engine=)."""
    from fruitpipe.index import EXACT_BELOW
    from fruitpipe.index import build_index as build

    return build(run_dir, _task_config(run_dir, options), space, metric,
                 EXACT_BELOW if exact_below is None else exact_below)


def similar(run_dir: str, queries: str | Sequence[str], /, k: int = 10, space: str = "pca",
            **options: Any) -> pd.DataFrame:
    """The k nearest training images of each query image (files or folders), extracted with the run's own model
    and PCA (options as for `transform`: master=, spark_conf=, ...), by the run's index.

    One row per query and neighbour: query, query_folder, rank, path, label, distance, vote_label, vote_share.
    Query images that could not be processed are listed in `frame.attrs["failed"]` as (query, reason).
    """
    from fruitpipe.index import similar as find_similar

    found, failed = find_similar(run_dir, [queries] if isinstance(queries, str) else list(queries), k, space,
                                 lambda source, output: _config(None, {"quiet": True, **options, "source": source,
                                                                       "output": output}))
    found.attrs["failed"] = failed
    return found


def find_duplicates(run_dir: str, test_run: str | None = None, threshold: float | None = None,
                    **options: Any) -> Duplicates:
    """Near-duplicate groups of RUN_DIR's images and, with `test_run`, its test images leaked from training; written
    to RUN_DIR/duplicates/ (see fruitpipe.duplicates) and returned. A large run's images are fingerprinted in tasks
    (options as for `transform`: master=, spark_conf=, engine=)."""
    from fruitpipe.duplicates import find_duplicates as find

    return find(run_dir, _task_config(run_dir, options), test_run, threshold)


def _task_config(run_dir: str, options: dict[str, Any]) -> RunConfig:
    """Where the tasks of a command about a finished run go (master, engine, Spark settings); source and output
    name the run, which a config must have, though the command lists no source."""
    return _config(None, {"quiet": True, **options, "source": run_dir, "output": run_dir})
