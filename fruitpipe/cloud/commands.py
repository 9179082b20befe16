"""What each `fruitpipe emr` subcommand does, given a validated config and an :class:`Aws`: the decisions,
the changes, what is printed and the exit status. The look-ups they rest on are in :mod:`.queries`.

Results (ids, URIs, JSON, reports) go to stdout so they can be captured; progress goes to stderr.
Nothing here prints credentials: identities are shown by account and ARN only.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from fruitpipe.config import load_yaml, resolve_config
from fruitpipe.errors import FruitpipeError
from fruitpipe.extras import MissingExtra
from fruitpipe.models.artifact import ARTIFACT_JSON, ARTIFACT_ONNX, export_artifact, load_artifact

from . import cost, queries, specs
from .bootstrap import (NODE_PLATFORMS, NODE_PYTHON_VERSION, build_wheel, executor_pins, pack_wheelhouse,
                        project_root, render_bootstrap)
from .client import Aws, AwsError
from .config import EmrConfig
from .instances import INSTANCE_TYPES

TERMINATED_STATES = ("TERMINATED", "TERMINATED_WITH_ERRORS")
ACTIVE_STEP_STATES = ("PENDING", "RUNNING", "CANCEL_PENDING")
FAILED_STEP_STATES = ("FAILED", "CANCELLED", "INTERRUPTED")
# Service Quotas codes: running on-demand / requested spot vCPUs of the standard families (m, c, r, ...).
ON_DEMAND_QUOTA = "L-1216C47A"
SPOT_QUOTA = "L-34B43A08"
_STEP_ID = re.compile(r"^s-[0-9A-Z]{8,20}$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def info(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------- check, roles, bucket


def check(config: EmrConfig, aws: Aws) -> int:
    """Reports what is ready and what is missing to run on EMR; exit status 1 when something is missing."""
    missing: list[str] = []

    def report(status: str, what: str, detail: str) -> None:
        print(f"{status:<8}{what:<14}{detail}")
        if status == "MISSING":
            missing.append(what)

    try:
        identity = queries.caller_identity(aws)
    except FruitpipeError as exc:
        report("MISSING", "credentials", str(exc))
        print("nothing else can be checked without working credentials")
        return 1
    report("ok", "credentials", f"account {identity['Account']} as {identity['Arn']} "
                                f"(found via {aws.credential_source()})")
    eu = config.region.startswith("eu-")
    report("ok", "region", config.region + ("" if eu else " (outside the EU, allowed by emr.allow_other_region)"))
    for what, section in (("bucket", _check_bucket), ("iam role", _check_roles), ("quota", _check_quotas)):
        try:
            section(config, aws, report)
        except FruitpipeError as exc:
            report("warn", what, f"could not check everything: {exc}")
    if missing:
        print(f"missing: {', '.join(missing)}")
        return 1
    print("ready: `fruitpipe emr up` can start a cluster")
    return 0


def _check_bucket(config: EmrConfig, aws: Aws, report: Callable[[str, str, str], None]) -> None:
    if not config.bucket:
        report("MISSING", "bucket", "not configured: set emr.bucket in the config file or pass --bucket")
        return
    bucket = config.bucket
    if not queries.bucket_exists(aws, bucket):
        report("MISSING", "bucket", f"s3://{bucket} does not exist: `fruitpipe emr bucket create` makes it "
                                    "private and encrypted")
        return
    region = queries.bucket_region(aws, bucket)
    if region != config.region and not config.allow_other_region:
        report("MISSING", "bucket", f"s3://{bucket} is in {region}, not {config.region}")
    else:
        report("ok", "bucket", f"s3://{bucket} in {region}")
    blocked = queries.public_access_blocked(aws, bucket)
    report("ok" if blocked else "warn", "public access",
           "blocked (all four settings)" if blocked else f"s3://{bucket} does not block all public access")
    algorithm = queries.default_encryption(aws, bucket)
    report("ok" if algorithm else "warn", "encryption",
           f"default {algorithm}" if algorithm else f"s3://{bucket} has no default encryption")
    script = config.uri(config.code_prefix, specs.BOOTSTRAP_NAME)
    if queries.object_exists(aws, script):
        report("ok", "code", f"{script} uploaded")
    else:
        report("warn", "code", "not uploaded yet: run `fruitpipe emr upload`")


def _check_roles(config: EmrConfig, aws: Aws, report: Callable[[str, str, str], None]) -> None:
    for role in specs.default_roles(config):
        if not queries.role_exists(aws, role.name):
            report("MISSING", "iam role", f"{role.name} does not exist: `fruitpipe emr roles create` makes it")
            continue
        report("ok", "iam role", role.name)
        if role.instance_profile:
            roles_in_profile = queries.instance_profile_roles(aws, role.name)
            if roles_in_profile is None or role.name not in roles_in_profile:
                report("MISSING", "profile", f"instance profile {role.name} with role {role.name}: "
                                             "`fruitpipe emr roles create` makes it")
            else:
                report("ok", "profile", f"instance profile {role.name}")


def _check_quotas(config: EmrConfig, aws: Aws, report: Callable[[str, str, str], None]) -> None:
    master = INSTANCE_TYPES[config.master_instance_type].vcpus * config.master_instance_count
    core = INSTANCE_TYPES[config.core_instance_type].vcpus * config.core_instance_count
    needs = [(ON_DEMAND_QUOTA, "on-demand vCPUs", master + (0 if config.spot else core))]
    if config.spot:
        needs.append((SPOT_QUOTA, "spot vCPUs", core))
    for code, label, needed in needs:
        try:
            limit = queries.ec2_quota(aws, code)
        except AwsError as exc:
            report("warn", "quota", f"{label}: not readable ({exc.code}); the cluster needs {needed}")
            continue
        status = "ok" if limit >= needed else "MISSING"
        report(status, "quota", f"{label}: {needed} needed, {limit:g} allowed in {config.region}")


def create_roles(config: EmrConfig, aws: Aws) -> int:
    """Creates the configured EMR service role and instance profile, as `aws emr create-default-roles` does."""
    tags = [{"Key": k, "Value": v} for k, v in config.all_tags().items()]
    for role in specs.default_roles(config):
        if queries.role_exists(aws, role.name):
            info(f"role {role.name} exists")
        else:
            aws.change("iam", "create_role", RoleName=role.name,
                       AssumeRolePolicyDocument=specs.trust_policy(role.service),
                       Description=f"EMR role for fruitpipe ({role.service})", Tags=tags)
            aws.change("iam", "attach_role_policy", RoleName=role.name, PolicyArn=role.managed_policy_arn)
            info(f"created role {role.name} with {role.managed_policy_arn}")
        if not role.instance_profile:
            continue
        roles_in_profile = queries.instance_profile_roles(aws, role.name)
        if roles_in_profile is None:
            aws.change("iam", "create_instance_profile", InstanceProfileName=role.name, Tags=tags)
            roles_in_profile = []
            info(f"created instance profile {role.name}")
        if role.name not in roles_in_profile:
            aws.change("iam", "add_role_to_instance_profile", InstanceProfileName=role.name, RoleName=role.name)
    return 0


def create_bucket(config: EmrConfig, aws: Aws) -> int:
    """Creates the configured bucket private and encrypted; an existing bucket is left as it is."""
    ensure_bucket(config, aws)
    return 0


def ensure_bucket(config: EmrConfig, aws: Aws) -> None:
    bucket = config.require_bucket()
    if queries.bucket_exists(aws, bucket):
        require_region(config, aws, bucket, "the configured")
        info(f"s3://{bucket} exists; its settings are left as they are (see `fruitpipe emr check`)")
        return
    for operation, params in specs.bucket_requests(config):
        aws.change("s3", operation, **params)
    if not aws.dry_run:
        algorithm = "aws:kms" if config.kms_key_id else "AES256"
        info(f"created s3://{bucket} in {config.region}: public access blocked, default encryption {algorithm}")


def require_region(config: EmrConfig, aws: Aws, bucket: str, what: str) -> None:
    """Refuses a bucket outside the configured region unless emr.allow_other_region is set."""
    try:
        region = queries.bucket_region(aws, bucket)
    except AwsError as exc:
        if exc.code == "NoSuchBucket":
            raise FruitpipeError(f"{what} bucket s3://{bucket} does not exist") from None
        raise
    if region != config.region and not config.allow_other_region:
        raise FruitpipeError(f"{what} bucket s3://{bucket} is in {region}, not {config.region}: refusing to move "
                             "data across regions (set emr.allow_other_region: true to allow it)")


# ---------------------------------------------------------------- upload, up, submit


def upload(config: EmrConfig, aws: Aws, wheel: Path | None, run_config: str | None, offline: bool = False,
           model_file: str | None = None) -> int:
    """Puts the fruitpipe wheel, the model artifact, the bootstrap script and the run config under the code prefix.

    The artifact is ``model_file`` or, by default, the run config's model exported here (torch stays on this
    machine). With ``offline`` it also packs the nodes' dependency wheels into one tar, and the bootstrap
    installs from that tar with no package index (nodes without internet access).
    """
    bucket = config.require_bucket()
    root = project_root()
    pins = executor_pins(root)
    with tempfile.TemporaryDirectory(prefix="fruitpipe-upload-") as tmp:
        # The model first: a model setting it cannot export fails before anything is created.
        model_files = _model_files(config, model_file, run_config, Path(tmp) / specs.MODEL_FOLDER)
        ensure_bucket(config, aws)
        if wheel is None:
            info("building the fruitpipe wheel")
            wheel = build_wheel(root, Path(tmp))
        elif not wheel.is_file():
            raise FruitpipeError(f"wheel {wheel} does not exist")
        wheel_uri = config.uri(config.code_prefix, wheel.name)
        files = [(wheel_uri, wheel.read_bytes(), "application/zip"), *model_files]
        wheelhouse_uri = None
        if offline:
            info(f"downloading the nodes' dependency wheels (CPython {NODE_PYTHON_VERSION}, {NODE_PLATFORMS[0]} "
                 "and older)")
            wheelhouse = pack_wheelhouse(pins, Path(tmp) / "wheelhouse")
            wheelhouse_uri = config.uri(config.code_prefix, wheelhouse.name)
            files.append((wheelhouse_uri, wheelhouse.read_bytes(), "application/x-tar"))
        script = render_bootstrap(pins, wheel_uri, wheelhouse_source=wheelhouse_uri)
        files.append((config.uri(config.code_prefix, specs.BOOTSTRAP_NAME), script.encode(), "text/x-shellscript"))
    if run_config:
        files.append((config.uri(config.code_prefix, specs.RUN_CONFIG_NAME), node_run_config(run_config),
                      "application/yaml"))
    for uri, body, content_type in files:
        key = queries.split_s3(uri)[1]
        aws.change("s3", "put_object", Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        if not aws.dry_run:
            print(uri)
    return 0


def _model_files(config: EmrConfig, model_file: str | None, run_config: str | None,
                 folder: Path) -> list[tuple[str, bytes, str]]:
    """(URI, bytes, content type) of the model artifact under the code prefix, model.json last as its commit."""
    if model_file is None:
        # Where the step reads and writes unless told otherwise, as `submit` decides them.
        settings = resolve_config(run_config, {}, defaults={"source": config.uri(config.input_prefix),
                                                            "output": config.uri(config.output_prefix)})
        if settings.model_file:
            model_file = settings.model_file
        elif settings.precision != "fp32":
            raise FruitpipeError("`emr upload` exports fp32 models; for int8, calibrate once with `fruitpipe "
                                 "export-model OUT --precision int8 --calibration SRC` and pass --model-file OUT")
        else:
            info(f"exporting the {settings.model} model artifact")
            try:
                export_artifact(settings.model, settings.weights, str(folder), image_size=settings.image_size,
                                cache_dir=settings.cache_dir)
            except MissingExtra as exc:
                raise exc.instead("pass --model-file ARTIFACT made by `fruitpipe export-model` elsewhere") from None
            model_file = str(folder)
    artifact, onnx = load_artifact(model_file)
    info(f"model artifact: {artifact.name} {artifact.precision} at {artifact.input_size} px")
    model_uri = config.uri(config.code_prefix, specs.MODEL_FOLDER)
    return [(f"{model_uri}/{ARTIFACT_ONNX}", onnx, "application/octet-stream"),
            (f"{model_uri}/{ARTIFACT_JSON}", json.dumps(artifact.to_json(), indent=2).encode(), "application/json")]


def node_run_config(path: str) -> bytes:
    """The run config file as the nodes get it: without ``weights``, which the model artifact already holds
    (and `run --model-file` refuses beside it); otherwise byte for byte."""
    document = load_yaml(path)
    if "weights" not in document:
        return Path(path).read_bytes()
    return yaml.safe_dump({k: v for k, v in document.items() if k != "weights"}, sort_keys=False).encode()


def up(config: EmrConfig, aws: Aws, wait: bool, interval: float, timeout: float | None) -> int:
    """Starts the cluster; prints its id."""
    bucket = config.require_bucket()
    script = config.uri(config.code_prefix, specs.BOOTSTRAP_NAME)
    if not queries.bucket_exists(aws, bucket) or not queries.object_exists(aws, script):
        if not aws.dry_run:
            raise FruitpipeError(f"{script} is missing: run `fruitpipe emr upload` first")
        info(f"note: {script} is missing; run `fruitpipe emr upload` before a real `up`")
    else:
        require_region(config, aws, bucket, "the configured")
    response = aws.change("emr", "run_job_flow", **specs.cluster_request(config))
    if aws.dry_run:
        return 0
    cluster_id = response["JobFlowId"]
    print(cluster_id)
    rate = cost.hourly_rate(cost.node_groups(config))
    info(f"cluster {cluster_id} is starting in {config.region} at about ${rate.total:.2f}/h on demand; it ends "
         f"itself after {config.idle_timeout_s} s idle, `fruitpipe emr down` ends it now. "
         "Follow it with `fruitpipe emr status`.")
    if not wait:
        return 0
    state = wait_for(lambda: queries.cluster_state(aws, cluster_id), done=("WAITING", "RUNNING"),
                     failed=TERMINATED_STATES, interval=interval, timeout=timeout, label=cluster_id)
    return 0 if state in ("WAITING", "RUNNING") else 1


def submit(config: EmrConfig, aws: Aws, *, cluster: str | None, mode: str, source: str | None, output: str | None,
           run_name: str | None, run_args: list[str], run_config: str | None, wait: bool, interval: float,
           timeout: float | None) -> int:
    """Adds a `fruitpipe run` step to the cluster; prints the step id."""
    run_name = run_name or f"{mode}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    if not _RUN_NAME.match(run_name):
        raise FruitpipeError(f"run name {run_name!r} must be letters, digits, '.', '_' or '-' (it becomes a folder)")
    cluster_id = queries.resolve_cluster(aws, config, cluster, active_only=True)
    source = source or config.uri(config.input_prefix) + "/"
    output = output or config.uri(config.output_prefix, run_name) + "/"
    for what, uri in (("input", source), ("output", output)):
        if not uri.startswith("s3://"):
            raise FruitpipeError(f"the {what} {uri} must be an s3:// URI: the cluster cannot read this machine")
        require_region(config, aws, queries.split_s3(uri)[0], f"the {what}")
    model_uri = config.uri(config.code_prefix, specs.MODEL_FOLDER)
    if not queries.object_exists(aws, f"{model_uri}/{ARTIFACT_JSON}"):
        if not aws.dry_run:
            raise FruitpipeError(f"{model_uri}/ holds no model artifact: run `fruitpipe emr upload` first")
        info(f"note: {model_uri}/ holds no model artifact; run `fruitpipe emr upload` before a real `submit`")
    steps = []
    node_config = None
    if run_config:
        config_uri = config.uri(config.code_prefix, specs.RUN_CONFIG_NAME)
        _sync_object(aws, config_uri, node_run_config(run_config))
        steps.append(specs.fetch_config_step(config_uri))
        node_config = specs.NODE_RUN_CONFIG
    steps.append(specs.run_step(source, output, mode, run_args, node_config, model_file=model_uri))
    response = aws.change("emr", "add_job_flow_steps", JobFlowId=cluster_id, Steps=steps)
    if aws.dry_run:
        return 0
    step_id = response["StepIds"][-1]
    print(step_id)
    info(f"step {step_id} runs on {cluster_id}; results go to {output} "
         f"(then `fruitpipe emr download {output}`)")
    if not wait:
        return 0
    state = wait_for(lambda: queries.step_state(aws, cluster_id, step_id), done=("COMPLETED",),
                     failed=FAILED_STEP_STATES, interval=interval, timeout=timeout, label=step_id)
    if state in FAILED_STEP_STATES:
        info(f"see its logs with `fruitpipe emr logs --cluster {cluster_id} --step {step_id}`")
    return 0 if state == "COMPLETED" else 1


def _sync_object(aws: Aws, uri: str, body: bytes) -> None:
    """Uploads ``body`` to ``uri`` unless the object there already has exactly these bytes."""
    if queries.object_bytes(aws, uri) != body:
        bucket, key = queries.split_s3(uri)
        aws.change("s3", "put_object", Bucket=bucket, Key=key, Body=body, ContentType="application/yaml")
        if not aws.dry_run:
            info(f"uploaded the run config to {uri}")


# ---------------------------------------------------------------- waiting and status


def wait_for(poll: Callable[[], tuple[str, str]], *, done: Collection[str], failed: Collection[str],
             interval: float, timeout: float | None, label: str,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> str:
    """Polls ``poll`` (state, detail) until a done or failed state, printing each change; returns the last state.

    A timeout is not an error of the resource: the last state is returned and the caller reports it.
    """
    start = clock()
    last = None
    while True:
        state, detail = poll()
        if state != last:
            info(f"{label}: {state}" + (f" ({detail})" if detail else "") + f" after {duration(clock() - start)}")
            last = state
        if state in done or state in failed:
            return state
        if timeout is not None and clock() - start >= timeout:
            info(f"{label}: still {state} after {duration(timeout)}; stopped waiting (it carries on)")
            return state
        sleep(interval)


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _elapsed(timeline: dict[str, Any], start_key: str) -> str:
    start = timeline.get(start_key)
    if start is None:
        return "-"
    end = timeline.get("EndDateTime") or datetime.now(timezone.utc)
    return duration((end - start).total_seconds())


def status(config: EmrConfig, aws: Aws, cluster: str | None) -> int:
    """Cluster state, node groups and steps with their elapsed times."""
    cluster_id = queries.resolve_cluster(aws, config, cluster, active_only=False)
    print("\n".join(_status_lines(aws, cluster_id)))
    return 0


def _status_lines(aws: Aws, cluster_id: str) -> list[str]:
    c = queries.cluster(aws, cluster_id)
    state = c["Status"]["State"]
    reason = c["Status"].get("StateChangeReason", {}).get("Message")
    lines = [f"cluster {cluster_id} ({c['Name']}): {state} for {_elapsed(c['Status']['Timeline'], 'CreationDateTime')}"
             + (f" - {reason}" if reason else "")]
    for group in queries.instance_groups(aws, cluster_id):
        lines.append(f"  {group['InstanceGroupType'].lower():<7}{group['RequestedInstanceCount']} x "
                     f"{group['InstanceType']} {group.get('Market', 'ON_DEMAND').lower()}, {group['Status']['State']}")
    steps = queries.steps(aws, cluster_id)
    if not steps:
        lines.append("  no steps yet: `fruitpipe emr submit` adds one")
    for step in steps:
        timeline = step["Status"]["Timeline"]
        started = "StartDateTime" if timeline.get("StartDateTime") else "CreationDateTime"
        lines.append(f"  step {step['Id']} {step['Name']}: {step['Status']['State']} for {_elapsed(timeline, started)}")
    return lines


def watch(config: EmrConfig, aws: Aws, cluster: str | None, interval: float, timeout: float | None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Prints cluster and step state changes until nothing more will happen without you, or ``timeout``."""
    cluster_id = queries.resolve_cluster(aws, config, cluster, active_only=False)
    seen: dict[str, str] = {}
    start = time.monotonic()
    while True:
        cluster_state = queries.cluster_state(aws, cluster_id)[0]
        steps = queries.steps(aws, cluster_id)
        current = {cluster_id: cluster_state, **{s["Id"]: s["Status"]["State"] for s in reversed(steps)}}
        names = {s["Id"]: s["Name"] for s in steps}
        for key, state in current.items():
            if seen.get(key) != state:
                label = f"step {key} ({names[key]})" if key in names else f"cluster {key}"
                print(f"{datetime.now(timezone.utc):%H:%M:%S} UTC, +{duration(time.monotonic() - start)}: "
                      f"{label}: {state}", flush=True)
        seen = current
        steps_active = any(s["Status"]["State"] in ACTIVE_STEP_STATES for s in steps)
        if cluster_state in TERMINATED_STATES or (cluster_state == "WAITING" and not steps_active):
            return 0
        if timeout is not None and time.monotonic() - start >= timeout:
            info(f"stopped watching after {duration(timeout)}; the cluster carries on")
            return 0
        sleep(interval)


# ---------------------------------------------------------------- logs, download, down


def logs(config: EmrConfig, aws: Aws, cluster: str | None, step: str | None, out: Path | None,
         tail: int) -> int:
    """Downloads a step's logs (gz-decompressed) and prints the end of its stderr."""
    cluster_id = queries.resolve_cluster(aws, config, cluster, active_only=False)
    if step is None:
        steps = queries.steps(aws, cluster_id)
        if not steps:
            raise FruitpipeError(f"cluster {cluster_id} has no steps, so no step logs")
        step = steps[0]["Id"]
    elif not _STEP_ID.match(step):
        raise FruitpipeError(f"{step} is not an EMR step id such as s-1XXXXXXXXXXXX")
    log_uri = queries.cluster(aws, cluster_id).get("LogUri")
    if not log_uri:
        raise FruitpipeError(f"cluster {cluster_id} was started without a log URI")
    bucket, prefix = queries.split_s3(log_uri)
    prefix = f"{prefix.rstrip('/')}/{cluster_id}/steps/{step}/".lstrip("/")
    dest = out or Path("emr-logs") / cluster_id / step
    written = []
    for key in queries.keys(aws, bucket, prefix):
        name = _relative(key, prefix)
        data = b"".join(queries.object_chunks(aws, bucket, key))
        if name.endswith(".gz"):
            data, name = gzip.decompress(data), name[:-3]
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    if not written:
        raise FruitpipeError(f"no logs yet under s3://{bucket}/{prefix}: EMR uploads step logs every few "
                             "minutes, try again shortly")
    for path in written:
        print(path)
    stderr = dest / "stderr"
    if stderr.is_file() and tail > 0:
        last = stderr.read_text(errors="replace").splitlines()[-tail:]
        print(f"--- last {len(last)} lines of {stderr} ---")
        print("\n".join(last))
    return 0


def _relative(key: str, prefix: str) -> str:
    """``key`` below ``prefix`` as a safe relative path: S3 keys must not write outside the destination."""
    name = key[len(prefix):]
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts:
        raise FruitpipeError(f"refusing to download s3 key {key!r}: it would land outside the destination")
    return name


def download(config: EmrConfig, aws: Aws, run: str, out: Path | None, overwrite: bool) -> int:
    """Copies a run's outputs (an s3:// URI, or a run name under the output prefix) to a local folder."""
    uri = run if run.startswith("s3://") else config.uri(config.output_prefix, run.strip("/"))
    bucket, prefix = queries.split_s3(uri)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    dest = out or Path("output") / (PurePosixPath(prefix).name or bucket)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FruitpipeError(f"{dest} is not empty; pass --overwrite or choose another --out")
    count = 0
    for key in queries.keys(aws, bucket, prefix):
        path = dest / _relative(key, prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            for chunk in queries.object_chunks(aws, bucket, key):
                handle.write(chunk)
        count += 1
    if count == 0:
        raise FruitpipeError(f"nothing under s3://{bucket}/{prefix}: check the run name or URI")
    print(dest)
    info(f"downloaded {count} file(s) from s3://{bucket}/{prefix}")
    return 0


def down(config: EmrConfig, aws: Aws, cluster: str | None, yes: bool, wait: bool, interval: float,
         timeout: float | None) -> int:
    """Terminates the cluster after confirmation; never without one, and never silently."""
    cluster_id = queries.resolve_cluster(aws, config, cluster, active_only=True)
    c = queries.cluster(aws, cluster_id)
    state = c["Status"]["State"]
    if state in TERMINATED_STATES:
        info(f"cluster {cluster_id} is already {state}")
        return 0
    if not yes and not aws.dry_run:
        if not sys.stdin.isatty():
            raise FruitpipeError(f"not terminating {cluster_id} without confirmation and there is no terminal "
                                 "to ask on: pass --yes")
        answer = input(f"Terminate cluster {cluster_id} ({c['Name']}, {state})? Its HDFS data is lost. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            info(f"cluster {cluster_id} left {state}")
            return 1
    aws.change("emr", "terminate_job_flows", JobFlowIds=[cluster_id])
    if aws.dry_run:
        return 0
    info(f"cluster {cluster_id} is terminating")
    if wait:
        wait_for(lambda: queries.cluster_state(aws, cluster_id), done=TERMINATED_STATES, failed=(),
                 interval=interval, timeout=timeout, label=cluster_id)
    return 0


# ---------------------------------------------------------------- cost, audit


def cost_actual(config: EmrConfig, aws: Aws, cluster: str | None, images: int | None) -> int:
    """Cost of a real cluster from its timeline (creation to termination, or now) and its node groups."""
    cluster_id = queries.resolve_cluster(aws, config, cluster, active_only=False)
    timeline = queries.cluster(aws, cluster_id)["Status"]["Timeline"]
    end = timeline.get("EndDateTime")
    seconds = ((end or datetime.now(timezone.utc)) - timeline["CreationDateTime"]).total_seconds()
    hours = max(seconds, 60) / 3600  # EMR and EC2 bill per second with a one-minute minimum
    groups = [cost.NodeGroup(g["InstanceType"], g["RequestedInstanceCount"])
              for g in queries.instance_groups(aws, cluster_id)]
    print(cost.format_actual(cluster_id, groups, hours, images, config.region, finished=end is not None))
    return 0
