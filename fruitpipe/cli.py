"""The `fruitpipe` command: parses flags, builds a config, calls the Python API, prints a short summary.

Every user-fixable problem (a missing optional dependency included) ends as one line on stderr and exit code 2;
anything unexpected as one line naming the file that holds its traceback, exit code 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fruitpipe.config import (CSV_SINGLE_FILE_MAX_IMAGES, ENGINES, FIELD_TYPES, MODES, PRECISIONS, RUNTIMES, SPLITS,
                              RunConfig, parse_spark_conf, resolve_config)
from fruitpipe.errors import FruitpipeError
from fruitpipe.extras import MissingExtra, optional_module

if TYPE_CHECKING:
    from fruitpipe.run_folder import RunResult

EXIT_USAGE = 2
EXIT_UNEXPECTED = 1
EXIT_INTERRUPTED = 130
# A run that finished with images left to retry (their loads timed out): its outputs are valid, not complete.
EXIT_INCOMPLETE = 3


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"fruitpipe: error: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_selection_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("which images")
    group.add_argument("--mode", choices=MODES,
                       help="preset: mini = 300 images spread over classes, apples = classes Apple*, full = all "
                            "(default: full)")
    group.add_argument("--classes", nargs="+", metavar="GLOB", help="only classes matching these globs")
    group.add_argument("--per-class", type=_positive_int, metavar="N", help="at most N images per class")
    group.add_argument("--limit", type=_positive_int, metavar="N", help="at most N images, spread over classes")
    group.add_argument("--split", choices=SPLITS, help="which split folder to read (default Training)")


def _add_spark_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("spark")
    group.add_argument("--master", help="Spark master URL (default local[*]); e.g. spark://host:7077, yarn")
    group.add_argument("--engine", choices=ENGINES,
                       help="where the tasks run: spark, a local process pool, or auto (default): the local pool for "
                            "a small run on this machine (no --master or a local one, no --spark-conf), else Spark")
    group.add_argument("--spark-conf", action="append", metavar="KEY=VALUE", help="a Spark setting (repeatable)")
    group.add_argument("--threads-per-task", type=_positive_int, metavar="N",
                       help="ONNX Runtime threads per Spark task; keep tasks x threads <= cores (default 1)")
    group.add_argument("--batch-size", type=_positive_int, metavar="N",
                       help="images per inference batch (default 2: small batches stay in the CPU cache)")
    group.add_argument("--shard-size", type=_positive_int, metavar="N",
                       help="images per shard, the unit of a task and of resume (default: up to 1024, "
                            "at least 8 shards)")
    group.add_argument("--read-timeout", type=float, dest="read_timeout_s", metavar="SECONDS",
                       help="give up on one image after this long reading + decoding (default 60)")
    group.add_argument("--read-attempts", type=_positive_int, metavar="N",
                       help="times an image whose load timed out is tried before the run leaves it for the next "
                            "run of the same command, which retries it (default 3)")


def _add_task_flags(parser: argparse.ArgumentParser, which: str) -> None:
    """Where the tasks of a command about a finished run go: --master, --engine, --spark-conf."""
    group = parser.add_argument_group("tasks", f"{which}; these say where")
    group.add_argument("--master", help="Spark master URL (default local[*]); e.g. spark://host:7077, yarn")
    group.add_argument("--engine", choices=ENGINES, help="spark, a local process pool, or auto (default)")
    group.add_argument("--spark-conf", action="append", metavar="KEY=VALUE", help="a Spark setting (repeatable)")


def _add_space_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", choices=["pca", "features"], default="pca",
                        help="the run's PCA vectors (default) or its raw features")


def build_parser() -> argparse.ArgumentParser:
    from fruitpipe.version import __version__

    parser = _Parser(prog="fruitpipe", description="Pretrained-CNN features, PCA and clean outputs for "
                                                   "folders of fruit photos, on Apache Spark.")
    parser.add_argument("--version", action="version", version=f"fruitpipe {__version__}")
    parser.add_argument("--config", metavar="YAML", help="YAML file of defaults (flags override it)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser("run", help="features + PCA + outputs for a folder of images",
                              description="List SRC, extract CNN features on Spark, fit a PCA, write OUT.")
    run.add_argument("source", nargs="?", metavar="SRC", help="folder or URI holding Training/<class>/*.jpg")
    run.add_argument("output", nargs="?", metavar="OUT", help="folder or URI for the run's outputs")
    _add_selection_flags(run)
    model = run.add_argument_group("model and PCA")
    model.add_argument("--model-file", metavar="URI",
                       help="model artifact folder from `fruitpipe export-model` (local or s3://): it sets the "
                            "model, weights, precision and input size, and the run needs no torch")
    model.add_argument("--model", help="feature model (default efficientnet_lite0; see `fruitpipe models`)")
    model.add_argument("--weights", help="weights file or URI (mobilenet_v2), or 'random' for speed tests")
    model.add_argument("--image-size", type=_positive_int, metavar="PX", help="input side (default: the model's)")
    model.add_argument("--precision", choices=PRECISIONS,
                       help="fp32 (default: the same features on every machine within 1e-4); bf16: the fp32 model "
                            "run in bf16 by OpenVINO, on CPUs with native bf16 (AVX512-BF16, AMX); int8: static "
                            "quantization calibrated on 64 of the run's images. Speed and quality: BENCHMARKS.md")
    model.add_argument("--runtime", choices=RUNTIMES,
                       help="auto (default): the fastest installed runtime for the model and precision on this "
                            "CPU, measured once and cached; or onnxruntime, openvino")
    model.add_argument("--pca-k", type=_positive_int, metavar="K", help="PCA components to keep (default 50)")
    model.add_argument("--pca-variance", type=float, metavar="FRACTION",
                       help="keep the fewest components reaching this explained variance, e.g. 0.95")
    output = run.add_argument_group("output")
    output.add_argument("--features-csv", action="store_true", default=None, help="also write csv/features.csv")
    output.add_argument("--csv-merged", action="store_true", default=None,
                        help=f"one CSV file per table (csv/pca.csv, ...) even for a run of more than "
                             f"{CSV_SINGLE_FILE_MAX_IMAGES:,} images, which otherwise keeps a folder of parts per "
                             "table (csv/pca/part-*.csv)")
    output.add_argument("--overwrite", action="store_true", default=None, help="replace an existing run in OUT")
    output.add_argument("--quiet", action="store_true", default=None, help="no progress output")
    output.add_argument("--cache-dir", help="where exported models and downloaded weights are kept")
    _add_spark_flags(run)
    run.set_defaults(handler=_cmd_run)

    export = commands.add_parser("export-model", help="write a model artifact (ONNX + model.json) for --model-file",
                                 description="Export a feature model to ONNX with its description into OUT (local "
                                             "or any URI), for `fruitpipe run --model-file OUT` on machines "
                                             "without torch. Needs the driver extra.")
    export.add_argument("output", metavar="OUT", help="folder or URI to write the artifact to")
    export.add_argument("--model", default="efficientnet_lite0", help="feature model (see `fruitpipe models`)")
    export.add_argument("--weights", help="weights file or URI (mobilenet_v2), or 'random' for speed tests")
    export.add_argument("--image-size", type=_positive_int, metavar="PX", help="input side (default: the model's)")
    export.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                        help="int8: ONNX Runtime static quantization calibrated here on --calibration SRC")
    export.add_argument("--calibration", metavar="SRC",
                        help="int8 only: images to calibrate on, a folder laid out like a run's SRC (its Training "
                             "split; 64 images spread over it)")
    export.add_argument("--cache-dir", help="where exported models and downloaded weights are kept")
    export.set_defaults(handler=_cmd_export_model)

    transform = commands.add_parser("transform", help="project new images with a finished run's model and PCA")
    transform.add_argument("run_dir", metavar="RUN_DIR")
    transform.add_argument("source", metavar="SRC")
    transform.add_argument("output", metavar="OUT")
    _add_selection_flags(transform)
    transform.add_argument("--overwrite", action="store_true", default=None)
    _add_spark_flags(transform)
    transform.set_defaults(handler=_cmd_transform)

    inventory = commands.add_parser("inventory", help="per-image and per-class CSV of what SRC holds")
    inventory.add_argument("source", metavar="SRC")
    inventory.add_argument("--out", required=True, metavar="OUT", help="folder or URI for images.csv, classes.csv")
    inventory.set_defaults(handler=_cmd_inventory)

    demo = commands.add_parser("demo-data", help="write a Fruits-360-like demo dataset")
    demo.add_argument("output", metavar="OUT")
    demo.add_argument("--classes", type=_positive_int, default=20, metavar="N", help="number of classes (<= 131)")
    demo.add_argument("--per-class", type=_positive_int, default=30, metavar="M", help="training images per class")
    demo.add_argument("--test-per-class", type=_positive_int, metavar="M", help="test images per class")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workers", type=_positive_int, help="processes (default: all cores)")
    demo.set_defaults(handler=_cmd_demo_data)

    predict = commands.add_parser("predict", help="ImageNet top-k for images: checks weights and preprocessing")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--model", default="efficientnet_lite0")
    predict.add_argument("--weights")
    predict.add_argument("--top", type=_positive_int, default=5)
    predict.add_argument("--cache-dir")
    predict.set_defaults(handler=_cmd_predict)

    models = commands.add_parser("models", help="list the feature models")
    models.set_defaults(handler=_cmd_models)

    evaluate = commands.add_parser("evaluate", help="1-NN, 5-NN and nearest-centroid accuracy on held-out images",
                                   description="Extract held-out images with RUN_DIR's model and PCA, then score "
                                               "k-NN and nearest-centroid classifiers fitted on the run's features.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR")
    evaluate.add_argument("--test", required=True, metavar="SRC", help="dataset root holding the held-out split")
    evaluate.add_argument("--work-dir", metavar="DIR",
                          help="where the held-out features go (default RUN_DIR/evaluation/test_run)")
    _add_selection_flags(evaluate)
    evaluate.add_argument("--overwrite", action="store_true", default=None, help="replace earlier held-out features")
    evaluate.add_argument("--quiet", action="store_true", default=None, help="no progress output")
    _add_spark_flags(evaluate)
    evaluate.set_defaults(handler=_cmd_evaluate)

    report = commands.add_parser("report", help="write RUN_DIR/report/index.html with figures",
                                 description="One self-contained HTML page: variance, PCA scatter, classes, errors, "
                                             "timings, evaluation, configuration.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(handler=_cmd_report)

    index = commands.add_parser("index", help="build RUN_DIR/index/: nearest-neighbour search over the run's images",
                                description="A faiss index over the run's PCA vectors (or raw features): exact below "
                                            "--exact-below vectors, approximate (IVF, recall@10 measured) above.")
    index.add_argument("run_dir", metavar="RUN_DIR")
    _add_space_flag(index)
    index.add_argument("--metric", choices=["cosine", "l2"], default="cosine",
                       help="cosine distance on vectors centred on the training mean (default), or Euclidean")
    index.add_argument("--exact-below", type=_positive_int, metavar="N",
                       help="exact (flat) index below N vectors, approximate above (default 50000)")
    _add_task_flags(index, "a large run's index is built in tasks (over 256 MB of vectors)")
    index.set_defaults(handler=_cmd_index)

    similar = commands.add_parser("similar", help="the run's training images nearest to new photos",
                                  description="Extract IMAGE_OR_FOLDER... with RUN_DIR's model and PCA and print, per "
                                              "image, its k nearest training images and their vote for a label.")
    similar.add_argument("run_dir", metavar="RUN_DIR")
    similar.add_argument("queries", nargs="+", metavar="IMAGE_OR_FOLDER")
    similar.add_argument("--k", type=_positive_int, default=10, help="neighbours per image (default 10)")
    _add_space_flag(similar)
    similar.add_argument("--json", action="store_true", help="one JSON document on stdout")
    _add_spark_flags(similar)
    similar.set_defaults(handler=_cmd_similar)

    duplicates = commands.add_parser("duplicates", help="near-duplicate groups in a run and test images leaked from it",
                                     description="Compare the run's images by their pixels (re-read from its "
                                                 "source), group those closer than --threshold and, with --test, list "
                                                 "the test images whose nearest training image is that close. Writes "
                                                 "RUN_DIR/duplicates/.")
    duplicates.add_argument("run_dir", metavar="RUN_DIR")
    duplicates.add_argument("--test", metavar="RUN2", help="a finished run of held-out images (e.g. `fruitpipe "
                                                           "transform RUN_DIR SRC OUT --split Test`)")
    duplicates.add_argument("--threshold", type=float, metavar="T",
                            help="largest distance of near-duplicates (default 0.0012; see docs/similarity.md)")
    _add_task_flags(duplicates, "a large run's images are fingerprinted in tasks (over 20,000 images)")
    duplicates.set_defaults(handler=_cmd_duplicates)

    from fruitpipe.cloud.cli import register as register_emr

    register_emr(commands)
    return parser


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The --config file under the parsed flags that set RunConfig fields."""
    return resolve_config(args.config, _flag_values(args))


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags that set RunConfig fields, by field name (a flag's dest is its field's name)."""
    values = {name: getattr(args, name) for name in FIELD_TYPES if hasattr(args, name)}
    if values.get("spark_conf") is not None:
        values["spark_conf"] = parse_spark_conf(values["spark_conf"])
    return values


def _cmd_run(args: argparse.Namespace) -> int:
    import fruitpipe

    return _print_summary(fruitpipe.run(_run_config(args)))


def _cmd_export_model(args: argparse.Namespace) -> int:
    from fruitpipe.config import DEFAULT_CACHE_DIR
    from fruitpipe.models.artifact import export_artifact

    if args.precision == "int8" and not args.calibration:
        raise FruitpipeError("--precision int8 needs --calibration SRC: the images to calibrate the int8 model on")
    if args.precision != "int8" and args.calibration:
        raise FruitpipeError("--calibration applies to --precision int8 only")
    artifact = export_artifact(args.model, args.weights, args.output, image_size=args.image_size,
                               precision=args.precision, calibration_source=args.calibration,
                               cache_dir=args.cache_dir or DEFAULT_CACHE_DIR)
    print(f"wrote {args.output}: {artifact.name} {artifact.precision} at {artifact.input_size} px, "
          f"onnx sha256 {artifact.onnx_sha256[:12]}...")
    print(f"use it with: fruitpipe run SRC OUT --model-file {args.output}")
    return 0


def _cmd_transform(args: argparse.Namespace) -> int:
    import fruitpipe

    return _print_summary(fruitpipe.transform(args.run_dir, _run_config(args)))


def _print_summary(result: RunResult) -> int:
    """Print what a run produced; returns its exit status (EXIT_INCOMPLETE while images are left to retry)."""
    seconds = result.seconds
    to_retry = f", {result.images_retryable} to retry" if result.images_retryable else ""
    print(f"images: {result.images_ok} ok, {result.images_failed} failed{to_retry} of {result.images_listed} listed "
          f"({result.shards_total} shards, {result.shards_resumed} resumed)")
    print(f"speed: {result.images_per_second:.1f} images/s end to end ({seconds['total']:.1f} s; "
          f"extract {seconds.get('extract', 0):.1f} s, PCA fit {seconds.get('pca_fit', 0):.2f} s)")
    print(f"PCA: {result.feature_dim} -> {result.pca_k} components, variance kept {result.variance_kept:.1%}")
    from fruitpipe.run_folder import MANIFEST, TABLES, VARIANCE_CSV

    print(f"outputs: {result.output} ({', '.join(f'{table}/' for table in TABLES)}, {VARIANCE_CSV}, {MANIFEST})")
    if result.images_retryable:
        print(f"fruitpipe: {result.images_retryable} images timed out on every attempt (the storage stalled, the "
              "images may be fine); run the same command again to retry them", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import fruitpipe
    from fruitpipe.evaluate import format_table
    from fruitpipe.run_folder import EVALUATION_JSON

    flags = {**_flag_values(args), "output": args.work_dir}
    config = resolve_config(args.config, fruitpipe.evaluation_options(args.run_dir, args.test, flags))
    print(format_table(fruitpipe.evaluate_run(args.run_dir, config)))
    print(f"wrote {args.run_dir.rstrip('/')}/{EVALUATION_JSON}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import fruitpipe

    print(f"wrote {fruitpipe.write_report(args.run_dir)}")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    import fruitpipe
    from fruitpipe.run_folder import INDEX

    built = fruitpipe.build_index(args.run_dir, args.space, args.metric, args.exact_below, **_task_options(args))
    print(f"wrote {args.run_dir.rstrip('/')}/{INDEX}/: {built['kind']} {built['metric']} index of {built['count']} "
          f"{built['space']} vectors ({built['dim']}-d), recall@10 {built['recall_at_10']:.3f} against exact, "
          f"{built['build_seconds']:.1f} s")
    return 0


def _task_options(args: argparse.Namespace) -> dict[str, Any]:
    """The --config file's settings under the task flags, as keyword options."""
    config = resolve_config(args.config, {**_flag_values(args), "source": args.run_dir, "output": args.run_dir})
    return {"master": config.master, "engine": config.engine, "spark_conf": config.spark_conf}


def _cmd_similar(args: argparse.Namespace) -> int:
    import json

    from fruitpipe.index import similar

    def make_config(source: str, output: str) -> RunConfig:
        return resolve_config(args.config, {"quiet": True, **_flag_values(args), "source": source, "output": output})

    found, failed = similar(args.run_dir, args.queries, args.k, args.space, make_config)
    by_query = [(query, rows) for query, rows in found.groupby("query", sort=True)]
    if args.json:
        document = {"run_dir": args.run_dir, "space": args.space, "k": args.k,
                    "queries": [{"query": query, "query_folder": rows["query_folder"].iloc[0],
                                 "vote_label": rows["vote_label"].iloc[0],
                                 "vote_share": float(rows["vote_share"].iloc[0]),
                                 "neighbours": rows[["rank", "path", "label", "distance"]].to_dict("records")}
                                for query, rows in by_query],
                    "failed": [{"query": query, "reason": reason} for query, reason in failed]}
        print(json.dumps(document, indent=2))
    else:
        for query, rows in by_query:
            print(f"{query}: {rows['vote_label'].iloc[0]} ({rows['vote_share'].iloc[0]:.0%} of {len(rows)} neighbours)")
            for row in rows.itertuples():
                print(f"  {row.rank:3d}  {row.distance:.4f}  {row.label}  {row.path}")
    for query, reason in failed:
        print(f"fruitpipe: {query} could not be processed: {reason}", file=sys.stderr)
    return 0


def _cmd_duplicates(args: argparse.Namespace) -> int:
    import fruitpipe
    from fruitpipe.run_folder import DUPLICATES

    summary = fruitpipe.find_duplicates(args.run_dir, args.test, args.threshold, **_task_options(args)).summary
    print(f"{summary['groups']} near-duplicate groups holding {summary['images_in_groups']} of {summary['images']} "
          f"images (distance < {summary['threshold']:g}); {summary['cross_label_groups']} groups mix labels")
    if args.test:
        per_class = ", ".join(f"{label} {n}" for label, n in summary["leaked_per_class"].items())
        print(f"{summary['leaked_test_images']} of {summary['test_images']} test images have a training image that "
              f"close" + (f": {per_class}" if per_class else ""))
    shares = [f"{share:.0%} at >= {level}" for level, share in summary["pca_cosine_nearest"]["training"].items()]
    print(f"in PCA space (not copies, e.g. consecutive frames): training images with another at cosine similarity "
          f"{', '.join(shares)}")
    print(f"wrote {args.run_dir.rstrip('/')}/{DUPLICATES}/")
    return 0


def _cmd_inventory(args: argparse.Namespace) -> int:
    from fruitpipe.inventory import build_inventory

    summary = build_inventory(args.source, args.out)
    print(f"{summary.files} files in {summary.classes} class folders, {summary.unreadable} unreadable, "
          f"{summary.bytes / 1e6:.1f} MB")
    print(f"wrote {summary.images_csv} and {summary.classes_csv}")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from fruitpipe.demo_data import generate_demo_dataset

    summary = generate_demo_dataset(args.output, classes=args.classes, per_class=args.per_class, seed=args.seed,
                                    test_per_class=args.test_per_class, workers=args.workers)
    print(f"wrote {summary.training_images} training + {summary.test_images} test images in "
          f"{len(summary.classes)} classes to {summary.root} ({summary.seconds:.1f} s)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fruitpipe.config import DEFAULT_CACHE_DIR
    from fruitpipe.models import imagenet_classes
    from fruitpipe.models.predict import predict_topk
    from fruitpipe.models.specs import get_spec
    from fruitpipe.storage import locate, read_bytes, require_regular_file

    classes = len(imagenet_classes())
    if args.top > classes:
        raise FruitpipeError(f"--top must be at most {classes} (the ImageNet classes)")
    images = []
    for image in args.images:
        location = locate(image)
        try:
            require_regular_file(location, location.path)
            images.append(read_bytes(location, location.path))
        except FileNotFoundError:
            raise FruitpipeError(f"image not found: {image}") from None
    results = predict_topk(images, get_spec(args.model), args.weights, args.cache_dir or DEFAULT_CACHE_DIR, args.top)
    for image, top in zip(args.images, results):
        print(image)
        for class_id, name, probability in top:
            print(f"  {class_id:4d}  {probability:6.1%}  {name}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from fruitpipe.models.specs import available_models, get_spec

    for name in available_models():
        spec = get_spec(name)
        print(f"{name}: {spec.input_size}px {spec.interpolation}, {spec.feature_dim}-d features, "
              f"weights: {spec.weights_source}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fruitpipe` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except FruitpipeError as exc:
        print(f"fruitpipe: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fruitpipe: interrupted; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        module = optional_module(exc)
        if module is None:
            return _unexpected(exc)
        # Last resort: an optional import that no caller wrapped in needs_extras.
        print(f"fruitpipe: error: {MissingExtra(module, f'`fruitpipe {args.command}`')}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        return _unexpected(exc)


def _unexpected(exc: BaseException) -> int:
    """One line for a bug or an unforeseen failure; the full traceback goes to a file the line names."""
    lines = str(exc).strip().splitlines()
    head = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    details = "".join(traceback.format_exception(exc))
    folder = Path(tempfile.gettempdir()) / "fruitpipe-errors"
    path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(details, encoding="utf-8")
        where = f"full traceback in {path}"
    except OSError as write_error:
        where = f"the traceback could not be written to {path} ({write_error.strerror or write_error})"
    print(f"fruitpipe: unexpected error: {head}; {where}", file=sys.stderr)
    return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(main())
