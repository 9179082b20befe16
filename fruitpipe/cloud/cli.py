"""`fruitpipe emr ...` argument parsing. The top-level CLI calls :func:`register`; :func:`main` runs the same
parsers on their own (tests, or `python -m fruitpipe.cloud.cli`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from fruitpipe.config import MODES
from fruitpipe.errors import FruitpipeError

from . import cost, local
from .config import DEFAULT_RELEASE, EmrConfig, load_emr_config

# Command-line flags that override settings of the emr: section (flag attribute -> setting).
_OVERRIDES = {
    "region": "region", "bucket": "bucket", "master_type": "master_instance_type",
    "core_type": "core_instance_type", "core_count": "core_instance_count", "spot": "spot",
    "idle_timeout": "idle_timeout_s", "release_label": "release_label",
}


class _AfterDoubleDash(argparse.Action):
    """Keeps what follows ``--`` without the ``--`` itself (argparse's REMAINDER keeps it)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values[1:] if values[:1] == ["--"] else values)


@dataclass(frozen=True)
class Option:
    """One flag of a subcommand, as argparse's ``add_argument(*names, **settings)`` takes it."""

    names: tuple[str, ...]
    settings: Mapping[str, Any]


def option(*names: str, **settings: Any) -> Option:
    """An :class:`Option` written as the ``add_argument`` call it stands for, so the table reads like argparse."""
    return Option(names, settings)


@dataclass(frozen=True)
class Subcommand:
    """One `fruitpipe emr` subcommand: its words, help, flags and the function it runs.

    ``run`` is "module.function" in fruitpipe.cloud, imported on use. It is called as
    ``function(config, aws, **arguments)`` (``function(config, **arguments)`` for the module ``local``, which
    needs no AWS client), where each keyword parameter takes the parsed flag of the same name and ``run_config``
    takes the --config file. ``run_with_cluster`` runs instead when --cluster is given.
    """

    words: tuple[str, ...]
    help: str
    run: str
    shared: tuple[str, ...] = ()
    options: tuple[Option, ...] = ()
    run_with_cluster: str | None = None


# The words that group subcommands ("roles create"), with their help.
GROUPS = {"roles": "EMR IAM roles", "bucket": "the S3 bucket"}
# The module whose functions take no AWS client.
_LOCAL_MODULE = "local"

SUBCOMMANDS = (
    Subcommand(("check",), "check credentials, region, bucket, EMR roles and vCPU quotas; list what is missing",
               "commands.check"),
    Subcommand(("roles", "create"), "create EMR_DefaultRole, EMR_EC2_DefaultRole and its instance profile",
               "commands.create_roles", ("dry",)),
    Subcommand(("bucket", "create"), "create the bucket: public access blocked, encrypted by default",
               "commands.create_bucket", ("dry",)),
    Subcommand(("upload",), "build the fruitpipe wheel and upload it with the bootstrap script and run config",
               "commands.upload", ("dry",), (
                   option("--wheel", type=Path, help="upload this wheel instead of building one"),
                   option("--model-file", metavar="DIR", help="upload this model artifact (`fruitpipe export-model`) "
                                                               "instead of exporting the config's model"),
                   option("--offline", action="store_true",
                          help="also upload the nodes' dependency wheels, so the bootstrap needs no internet access"),
               )),
    Subcommand(("up",), "start a cluster and print its id", "commands.up", ("dry", "shape", "waiting"), (
        option("--release-label", help=f"EMR release (default {DEFAULT_RELEASE}; emr-spark-8.0.0 for Spark 4)"),
        option("--wait", action="store_true", help="wait until the cluster is ready for steps"),
    )),
    Subcommand(("submit",), "add a `fruitpipe run` step to the cluster and print its id", "commands.submit",
               ("dry", "cluster", "waiting"), (
                   option("--mode", choices=MODES, default="mini", help="run mode (default mini)"),
                   option("--input", dest="source", metavar="INPUT",
                          help="s3:// source folder (default: the input prefix)"),
                   option("--output", help="s3:// output folder (default: output prefix / run name)"),
                   option("--run-name", help="name of the output folder (default: MODE-UTCTIME)"),
                   option("--wait", action="store_true", help="follow the step until it ends"),
                   option("run_args", nargs=argparse.REMAINDER, action=_AfterDoubleDash,
                          help="after --: more arguments for `fruitpipe run`"),
               )),
    Subcommand(("status",), "cluster and step states with elapsed times", "commands.status", ("cluster",)),
    Subcommand(("watch",), "print state changes until the cluster waits idle or ends", "commands.watch",
               ("cluster", "waiting")),
    Subcommand(("logs",), "download a step's logs (decompressed) and show the end of its stderr", "commands.logs",
               ("cluster",), (
                   option("--step", help="step id (default: the newest step)"),
                   option("--out", type=Path, help="folder for the logs (default emr-logs/CLUSTER/STEP)"),
                   option("--tail", type=int, default=40, help="lines of stderr to show (default 40)"),
               )),
    Subcommand(("download",), "copy a run's outputs from S3 to a local folder", "commands.download", (), (
        option("run", help="s3:// URI of the run, or its name under the output prefix"),
        option("--out", type=Path, help="local folder (default output/RUN)"),
        option("--overwrite", action="store_true", help="write into a non-empty folder"),
    )),
    Subcommand(("down",), "terminate the cluster (asks first unless --yes)", "commands.down",
               ("dry", "cluster", "waiting"), (
                   option("--yes", action="store_true", help="do not ask for confirmation"),
                   option("--wait", action="store_true", help="wait until it is terminated"),
               )),
    Subcommand(("cost",), "estimate a run's cost, or report a real cluster's cost with --cluster", "local.estimate",
               ("shape",), (
                   option("--images", type=int, help=f"number of images (default {local.DEFAULT_ESTIMATE_IMAGES} "
                                                     "for an estimate)"),
                   option("--throughput", type=float,
                          help=f"images per second per executor vCPU (default {cost.DEFAULT_THROUGHPUT:.1f}: the "
                               f"measured {cost.MEASURED_IMAGES_PER_CORE_S:.2f} per core x {cost.SAFETY_FACTOR:g}, "
                               "see BENCHMARKS.md)"),
                   option("--startup-minutes", type=float, default=cost.DEFAULT_STARTUP_MINUTES,
                          help=f"billed minutes before work starts (default {cost.DEFAULT_STARTUP_MINUTES:g})"),
                   option("--cluster", help="report this cluster's real cost from its runtime instead of estimating"),
               ), run_with_cluster="commands.cost_actual"),
    Subcommand(("audit",), "list billable resources still alive, per region, and what they cost "
                           "(read only: never changes anything)", "audit.audit", (), (
        option("--all-regions", action="store_true", help="every region enabled for the account, not only --region"),
        option("--costs", action="store_true", help=f"also the cost per service of the last {cost.COST_EXPLORER_DAYS} "
                                                    "days (Cost Explorer, ce:GetCostAndUsage)"),
        option("--max-objects", type=int, default=100_000, help="stop counting a bucket's objects here"),
    )),
    Subcommand(("policy",), "print a least-privilege IAM policy for the cluster's instance profile", "local.policy"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `emr` command and one parser per row of :data:`SUBCOMMANDS`; each parser's ``handler(args) -> int``
    runs its row."""
    emr = subparsers.add_parser(
        "emr", help="run fruitpipe on AWS EMR: check, upload, up, submit, status, logs, download, down, cost",
        description="Run fruitpipe on AWS EMR. Settings come from the emr: section of --config; flags override "
                    "them. Commands that change something accept --dry-run, which prints the exact AWS request.")
    sub = emr.add_subparsers(dest="emr_command", metavar="COMMAND", required=True)
    common, shared = _shared_flags()
    groups: dict[str, argparse._SubParsersAction] = {}
    for row in SUBCOMMANDS:
        *group_words, name = row.words
        parent = sub
        for word in group_words:
            if word not in groups:
                groups[word] = sub.add_parser(word, help=GROUPS[word]).add_subparsers(
                    dest=f"{word}_command", metavar="COMMAND", required=True)
            parent = groups[word]
        parser = parent.add_parser(name, help=row.help, description=row.help,
                                   parents=[common, *(shared[group] for group in row.shared)])
        for flag in row.options:
            parser.add_argument(*flag.names, **flag.settings)
        parser.set_defaults(handler=functools.partial(_run, row))


def _shared_flags() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The flags of every subcommand (--region, --bucket), and the groups of flags rows name in ``shared``."""
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
    return common, {"dry": dry, "cluster": on_cluster, "waiting": waiting, "shape": shape}


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


def _run(row: Subcommand, args: argparse.Namespace) -> int:
    """Calls the row's function with the config, the client (unless local) and the flags its parameters name."""
    config = _config(args)
    target = row.run_with_cluster if row.run_with_cluster and args.cluster else row.run
    module_name, function_name = target.split(".")
    function = getattr(_import(module_name), function_name)
    flags = {**vars(args), "run_config": getattr(args, "config", None)}
    parameters = list(inspect.signature(function).parameters)
    client = [] if module_name == _LOCAL_MODULE else [_aws(args, config)]
    arguments = {name: flags[name] for name in parameters[1 + len(client):] if name in flags}
    return function(config, *client, **arguments)


def _config(args: argparse.Namespace) -> EmrConfig:
    overrides: dict[str, Any] = {setting: getattr(args, flag, None) for flag, setting in _OVERRIDES.items()}
    return load_emr_config(getattr(args, "config", None), overrides)


def _import(name: str) -> ModuleType:
    """Imported on use: boto3 is a driver extra, and registering these parsers must work without it."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as exc:
        raise FruitpipeError(f"`fruitpipe emr` needs {exc.name}: pip install 'fruitpipe[driver]'") from None


def _aws(args: argparse.Namespace, config: EmrConfig) -> Any:
    from .client import Aws

    return Aws(config.region, dry_run=getattr(args, "dry_run", False))


if __name__ == "__main__":
    sys.exit(main())
