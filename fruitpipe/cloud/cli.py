"""`fruitpipe emr ...` argument parsing. The top-level CLI calls :func:`register`; :func:`main` runs the same
parsers on their own (tests, or `python -m fruitpipe.cloud.cli`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from fruitpipe.errors import FruitpipeError

from . import cost, specs
from .config import DEFAULT_RELEASE, EmrConfig, load_emr_config

# Command-line flags that override settings of the emr: section (flag attribute -> setting).
_OVERRIDES = {
    "region": "region", "bucket": "bucket", "master_type": "master_instance_type",
    "core_type": "core_instance_type", "core_count": "core_instance_count", "spot": "spot",
    "idle_timeout": "idle_timeout_s", "release_label": "release_label",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `emr` command and its subcommands; each parser's ``handler(args) -> int`` does the work."""
    emr = subparsers.add_parser(
        "emr", help="run fruitpipe on AWS EMR: check, upload, up, submit, status, logs, download, down, cost",
        description="Run fruitpipe on AWS EMR. Settings come from the emr: section of --config; flags override "
                    "them. Commands that change something accept --dry-run, which prints the exact AWS request.")
    sub = emr.add_subparsers(dest="emr_command", metavar="COMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--region", help="AWS region (default eu-west-1)")
    common.add_argument("--bucket", help="S3 bucket for code, input, output and logs")
    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("--dry-run", action="store_true", help="print the AWS requests instead of sending them")
    on_cluster = argparse.ArgumentParser(add_help=False)
    on_cluster.add_argument("--cluster", help="cluster id (default: the active cluster named emr.cluster_name)")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--interval", type=float, default=30.0, help="seconds between polls (default 30)")
    waiting.add_argument("--timeout", type=float, help="stop waiting after this many seconds")
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--master-type", help="master instance type")
    shape.add_argument("--core-type", help="core instance type")
    shape.add_argument("--core-count", type=int, help="number of core nodes")
    shape.add_argument("--spot", action=argparse.BooleanOptionalAction, default=None,
                       help="core nodes on spot (master stays on-demand)")
    shape.add_argument("--idle-timeout", type=int, help="seconds of idleness before the cluster ends itself")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str,
            parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text, description=help_text, parents=[common, *parents])
        parser.set_defaults(handler=handler)
        return parser

    add("check", _check, "check credentials, region, bucket, EMR roles and vCPU quotas; list what is missing", [])

    roles = sub.add_parser("roles", help="EMR IAM roles")
    roles_sub = roles.add_subparsers(dest="roles_command", metavar="COMMAND", required=True)
    create = roles_sub.add_parser("create", parents=[common, dry],
                                  help="create EMR_DefaultRole, EMR_EC2_DefaultRole and its instance profile")
    create.set_defaults(handler=_roles_create)

    bucket = sub.add_parser("bucket", help="the S3 bucket")
    bucket_sub = bucket.add_subparsers(dest="bucket_command", metavar="COMMAND", required=True)
    create = bucket_sub.add_parser("create", parents=[common, dry],
                                   help="create the bucket: public access blocked, encrypted by default")
    create.set_defaults(handler=_bucket_create)

    p = add("upload", _upload, "build the fruitpipe wheel and upload it with the bootstrap script and run config",
            [dry])
    p.add_argument("--wheel", type=Path, help="upload this wheel instead of building one")
    p.add_argument("--model-file", metavar="DIR",
                   help="upload this model artifact (`fruitpipe export-model`) instead of exporting the config's model")
    p.add_argument("--offline", action="store_true",
                   help="also upload the nodes' dependency wheels, so the bootstrap needs no internet access")

    p = add("up", _up, "start a cluster and print its id", [dry, shape, waiting])
    p.add_argument("--release-label", help=f"EMR release (default {DEFAULT_RELEASE}; emr-spark-8.0.0 for Spark 4)")
    p.add_argument("--wait", action="store_true", help="wait until the cluster is ready for steps")

    p = add("submit", _submit, "add a `fruitpipe run` step to the cluster and print its id", [dry, on_cluster, waiting])
    p.add_argument("--mode", choices=specs.RUN_MODES, default="mini", help="run mode (default mini)")
    p.add_argument("--input", help="s3:// source folder (default: the input prefix)")
    p.add_argument("--output", help="s3:// output folder (default: output prefix / run name)")
    p.add_argument("--run-name", help="name of the output folder (default: MODE-UTCTIME)")
    p.add_argument("--wait", action="store_true", help="follow the step until it ends")
    p.add_argument("run_args", nargs=argparse.REMAINDER, help="after --: more arguments for `fruitpipe run`")

    add("status", _status, "cluster and step states with elapsed times", [on_cluster])
    add("watch", _watch, "print state changes until the cluster waits idle or ends", [on_cluster, waiting])

    p = add("logs", _logs, "download a step's logs (decompressed) and show the end of its stderr", [on_cluster])
    p.add_argument("--step", help="step id (default: the newest step)")
    p.add_argument("--out", type=Path, help="folder for the logs (default emr-logs/CLUSTER/STEP)")
    p.add_argument("--tail", type=int, default=40, help="lines of stderr to show (default 40)")

    p = add("download", _download, "copy a run's outputs from S3 to a local folder", [])
    p.add_argument("run", help="s3:// URI of the run, or its name under the output prefix")
    p.add_argument("--out", type=Path, help="local folder (default output/RUN)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")

    p = add("down", _down, "terminate the cluster (asks first unless --yes)", [dry, on_cluster, waiting])
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--wait", action="store_true", help="wait until it is terminated")

    p = add("cost", _cost, "estimate a run's cost, or report a real cluster's cost with --cluster", [shape])
    p.add_argument("--images", type=int, help="number of images (default 10000 for an estimate)")
    p.add_argument("--throughput", type=float,
                   help=f"images per second per executor vCPU (default {cost.DEFAULT_THROUGHPUT:.1f}: the measured "
                        f"{cost.MEASURED_IMAGES_PER_CORE_S:.2f} per core x {cost.SAFETY_FACTOR:g}, see BENCHMARKS.md)")
    p.add_argument("--startup-minutes", type=float, default=cost.DEFAULT_STARTUP_MINUTES,
                   help=f"billed minutes before work starts (default {cost.DEFAULT_STARTUP_MINUTES:g})")
    p.add_argument("--cluster", help="report this cluster's real cost from its runtime instead of estimating")

    p = add("audit", _audit, "list billable resources still alive, per region, and what they cost "
                             "(read only: never changes anything)", [])
    p.add_argument("--all-regions", action="store_true", help="every region enabled for the account, not only "
                                                                "--region")
    p.add_argument("--costs", action="store_true",
                   help=f"also the cost per service of the last {cost.COST_EXPLORER_DAYS} days "
                        "(Cost Explorer, ce:GetCostAndUsage)")
    p.add_argument("--max-objects", type=int, default=100_000, help="stop counting a bucket's objects here")

    add("policy", _policy, "print a least-privilege IAM policy for the cluster's instance profile", [])


def main(argv: list[str] | None = None) -> int:
    """Runs `fruitpipe [--config PATH] emr ...` with these parsers; returns the exit status."""
    parser = argparse.ArgumentParser(prog="fruitpipe")
    parser.add_argument("--config", help="YAML config file (its emr: section)")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except FruitpipeError as exc:
        print(f"fruitpipe: error: {exc}", file=sys.stderr)
        return 2


def _config(args: argparse.Namespace) -> EmrConfig:
    overrides: dict[str, Any] = {setting: getattr(args, flag, None) for flag, setting in _OVERRIDES.items()}
    return load_emr_config(getattr(args, "config", None), overrides)


def _aws_module(name: str = "commands") -> ModuleType:
    """Imported on use: boto3 is a driver extra, and registering these parsers must work without it."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as exc:
        raise FruitpipeError(f"`fruitpipe emr` needs {exc.name}: pip install 'fruitpipe[driver]'") from None


def _aws(args: argparse.Namespace, config: EmrConfig) -> Any:
    from .client import Aws

    return Aws(config.region, dry_run=getattr(args, "dry_run", False))


def _check(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().check(config, _aws(args, config))


def _roles_create(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().create_roles(config, _aws(args, config))


def _bucket_create(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().create_bucket(config, _aws(args, config))


def _upload(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().upload(config, _aws(args, config), args.wheel, getattr(args, "config", None), args.offline,
                              args.model_file)


def _up(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().up(config, _aws(args, config), args.wait, args.interval, args.timeout)


def _submit(args: argparse.Namespace) -> int:
    config = _config(args)
    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    return _aws_module().submit(config, _aws(args, config), cluster=args.cluster, mode=args.mode, source=args.input,
                           output=args.output, run_name=args.run_name, run_args=run_args,
                           run_config=getattr(args, "config", None), wait=args.wait, interval=args.interval,
                           timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().status(config, _aws(args, config), args.cluster)


def _watch(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().watch(config, _aws(args, config), args.cluster, args.interval, args.timeout)


def _logs(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().logs(config, _aws(args, config), args.cluster, args.step, args.out, args.tail)


def _download(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().download(config, _aws(args, config), args.run, args.out, args.overwrite)


def _down(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module().down(config, _aws(args, config), args.cluster, args.yes, args.wait, args.interval, args.timeout)


def _cost(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.cluster:
        return _aws_module().cost_actual(config, _aws(args, config), args.cluster, args.images)
    images = 10_000 if args.images is None else args.images
    print(cost.format_estimate(config, cost.estimate(config, images, args.throughput, args.startup_minutes)))
    return 0


def _audit(args: argparse.Namespace) -> int:
    config = _config(args)
    return _aws_module("audit").audit(_aws(args, config), all_regions=args.all_regions, costs=args.costs,
                                    max_objects=args.max_objects)


def _policy(args: argparse.Namespace) -> int:
    config = _config(args)
    print(json.dumps(specs.job_role_policy(config), indent=2))
    print(f"attach it to the role of the instance profile in emr.instance_profile ({config.instance_profile}) "
          "in place of AmazonElasticMapReduceforEC2Role", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
