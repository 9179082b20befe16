"""What a cluster costs: instance-hours times the dated price table (EC2 on-demand + EMR surcharge).

Pure arithmetic on the table in prices.py, so an estimate needs no AWS account. Storage, data transfer,
EBS volumes and taxes are not included; every report says so.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fruitpipe.errors import FruitpipeError

from . import prices
from .config import EmrConfig
from .instances import INSTANCE_TYPES

# Provisioning plus the bootstrap pip install, billed before the first image is read.
DEFAULT_STARTUP_MINUTES = 12.0
# Measured: BENCHMARKS.md, 2026-11-30, FULL run (67,692 images) end to end, 176.0 img/s on 2 AMD EPYC cores
# (1 thread per core), efficientnet_lite0 fp32 (the default: --runtime auto), batch 2, one task per core.
# End to end (listing, decoding, writing and the PCA included) rather than the inference ceiling, because a run
# pays for all of it.
MEASURED_IMAGES_PER_CORE_S = 176.0 / 2  # = 88.00
MEASURED_ON = "BENCHMARKS.md, 2026-11-30: FULL run end to end on 2 AMD EPYC cores, efficientnet_lite0 fp32"
# An EMR m5/c5/r5 vCPU is one hyperthread: two of them share a physical core, and two compute-bound ONNX
# Runtime tasks on one core do well under twice the work of one. Executors also read every image from S3
# (one request per small JPEG) where the benchmark read a local disk. Half the measured per-core rate covers both.
SAFETY_FACTOR = 0.5
# Images per second per executor vCPU that estimates assume; pass --throughput with your own measurement.
DEFAULT_THROUGHPUT = MEASURED_IMAGES_PER_CORE_S * SAFETY_FACTOR

# `fruitpipe emr audit --costs` asks Cost Explorer for this many days before today.
COST_EXPLORER_DAYS = 30

EXCLUDED = "excludes S3 storage and requests, data transfer, EBS volumes and taxes"


@dataclass(frozen=True)
class NodeGroup:
    instance_type: str
    count: int


@dataclass(frozen=True)
class Rate:
    """USD per hour for a whole cluster, split as AWS bills it."""

    ec2: float
    emr: float

    @property
    def total(self) -> float:
        return self.ec2 + self.emr


@dataclass(frozen=True)
class Estimate:
    images: int
    throughput: float
    # True when ``throughput`` is DEFAULT_THROUGHPUT, derived from the benchmark, rather than the user's figure.
    measured: bool
    executor_vcpus: int
    compute_h: float
    startup_h: float
    idle_h: float
    rate: Rate

    @property
    def busy_h(self) -> float:
        return self.startup_h + self.compute_h

    @property
    def usd_if_downed(self) -> float:
        """Cost when `fruitpipe emr down` runs as soon as the run ends."""
        return self.busy_h * self.rate.total

    @property
    def usd_if_idle(self) -> float:
        """Cost when the cluster waits out its idle timeout before terminating itself."""
        return (self.busy_h + self.idle_h) * self.rate.total


def node_groups(config: EmrConfig) -> list[NodeGroup]:
    return [NodeGroup(config.master_instance_type, config.master_instance_count),
            NodeGroup(config.core_instance_type, config.core_instance_count)]


def hourly_rate(groups: Iterable[NodeGroup]) -> Rate:
    """USD per hour for these nodes; unknown instance types are an error rather than a silent zero."""
    ec2 = emr = 0.0
    for group in groups:
        if group.instance_type not in prices.USD_PER_HOUR:
            raise FruitpipeError(f"no price for {group.instance_type} in the table of {prices.AS_OF}; "
                                 f"known: {', '.join(prices.USD_PER_HOUR)}")
        ec2_price, emr_price = prices.USD_PER_HOUR[group.instance_type]
        ec2 += group.count * ec2_price
        emr += group.count * emr_price
    return Rate(ec2, emr)


def estimate(config: EmrConfig, images: int, throughput: float | None = None,
             startup_minutes: float = DEFAULT_STARTUP_MINUTES) -> Estimate:
    """Cost of processing ``images`` on the configured cluster at ``throughput`` images/s per executor vCPU.

    Without ``throughput`` the measured rate times the safety factor is used (DEFAULT_THROUGHPUT).
    """
    measured = throughput is None
    throughput = DEFAULT_THROUGHPUT if throughput is None else throughput
    if images < 0 or throughput <= 0 or startup_minutes < 0:
        raise FruitpipeError("images and start-up minutes must be >= 0 and throughput > 0")
    vcpus = INSTANCE_TYPES[config.core_instance_type].vcpus * config.core_instance_count
    return Estimate(images=images, throughput=throughput, measured=measured, executor_vcpus=vcpus,
                    compute_h=images / (throughput * vcpus) / 3600, startup_h=startup_minutes / 60,
                    idle_h=config.idle_timeout_s / 3600, rate=hourly_rate(node_groups(config)))


def usd_to_eur(usd: float) -> float:
    return usd * prices.EUR_PER_USD


def money(usd: float, digits: int = 2) -> str:
    """'$1.23 (€1.06)': the table's US dollars, and euros at its fixed rate."""
    return f"${usd:,.{digits}f} (€{usd_to_eur(usd):,.{digits}f})"


def per_10k(usd: float, images: int) -> str:
    return f"{money(usd / images * 10_000, 4)} per 10k images" if images else "no images given"


def hours(h: float) -> str:
    """'1.25 h (1:15)': decimal hours for the arithmetic, h:mm to read."""
    minutes = round(h * 60)
    return f"{h:.2f} h ({minutes // 60}:{minutes % 60:02d})"


def price_note(region: str) -> str:
    note = (f"on-demand prices of {prices.REGION} in USD as of {prices.AS_OF}, € at the table's fixed "
            f"{prices.EUR_PER_USD:g} €/$; {EXCLUDED}")
    if region != prices.REGION:
        note += f"; the cluster is in {region}, whose prices differ"
    return note


def format_estimate(config: EmrConfig, e: Estimate) -> str:
    """The estimate as the lines `fruitpipe emr cost` prints."""
    lines = [
        f"cluster: {config.master_instance_count} x {config.master_instance_type} master + "
        f"{config.core_instance_count} x {config.core_instance_type} core"
        + (" (spot: the EC2 part is an on-demand upper bound)" if config.spot else ""),
        f"speed: {e.throughput:.1f} images/s per executor vCPU" + (
            f" (measured {MEASURED_IMAGES_PER_CORE_S:.2f} per core x safety factor {SAFETY_FACTOR:g}; {MEASURED_ON})"
            if e.measured else " (--throughput)"),
        f"time: {e.images:,} images on {e.executor_vcpus} executor vCPUs = {hours(e.compute_h)}, plus "
        f"{hours(e.startup_h)} start-up",
        f"rate: ${e.rate.total:.3f}/h (EC2 ${e.rate.ec2:.3f} + EMR ${e.rate.emr:.3f})",
        f"with `fruitpipe emr down` right after the run: {money(e.usd_if_downed)}, "
        f"{per_10k(e.usd_if_downed, e.images)}",
        f"left to auto-terminate after {e.idle_h:g} h idle: {money(e.usd_if_idle)}, "
        f"{per_10k(e.usd_if_idle, e.images)}",
        price_note(config.region),
    ]
    return "\n".join(lines)


def format_actual(cluster_id: str, groups: list[NodeGroup], hours: float, images: int | None,
                  region: str, finished: bool) -> str:
    """What a cluster has cost from its real runtime."""
    rate = hourly_rate(groups)
    usd = hours * rate.total
    nodes = " + ".join(f"{g.count} x {g.instance_type}" for g in groups)
    lines = [
        f"cluster {cluster_id}: {nodes}, {hours:.2f} h " + ("in total" if finished else "so far (still running)"),
        f"rate: ${rate.total:.3f}/h (EC2 ${rate.ec2:.3f} + EMR ${rate.emr:.3f})",
        f"cost: {money(usd)}" + (f", {per_10k(usd, images)}" if images else ""),
        price_note(region),
    ]
    return "\n".join(lines)
