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
# Images per second per executor vCPU: an assumption for EfficientNet-Lite0 on ONNX Runtime with one
# thread per task; measure your own with the benchmark and pass --throughput.
DEFAULT_THROUGHPUT = 10.0

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


def estimate(config: EmrConfig, images: int, throughput: float = DEFAULT_THROUGHPUT,
             startup_minutes: float = DEFAULT_STARTUP_MINUTES) -> Estimate:
    """Cost of processing ``images`` on the configured cluster at ``throughput`` images/s per executor vCPU."""
    if images < 0 or throughput <= 0 or startup_minutes < 0:
        raise FruitpipeError("images and start-up minutes must be >= 0 and throughput > 0")
    vcpus = INSTANCE_TYPES[config.core_instance_type].vcpus * config.core_instance_count
    return Estimate(images=images, throughput=throughput, executor_vcpus=vcpus,
                    compute_h=images / (throughput * vcpus) / 3600, startup_h=startup_minutes / 60,
                    idle_h=config.idle_timeout_s / 3600, rate=hourly_rate(node_groups(config)))


def usd_to_eur(usd: float) -> float:
    return usd * prices.EUR_PER_USD


def money(usd: float) -> str:
    """'$1.23 (€1.06)' at the table's fixed rate."""
    return f"${usd:,.2f} (€{usd_to_eur(usd):,.2f})"


def per_10k(usd: float, images: int) -> str:
    return f"${usd / images * 10_000:,.4f} per 10k images" if images else "no images given"


def price_note(region: str) -> str:
    note = f"on-demand prices of {prices.REGION} as of {prices.AS_OF}; {EXCLUDED}"
    if region != prices.REGION:
        note += f"; the cluster is in {region}, whose prices differ"
    return note


def format_estimate(config: EmrConfig, e: Estimate) -> str:
    """The estimate as the lines `fruitpipe emr cost` prints."""
    lines = [
        f"cluster: {config.master_instance_count} x {config.master_instance_type} master + "
        f"{config.core_instance_count} x {config.core_instance_type} core"
        + (" (spot: the EC2 part is an on-demand upper bound)" if config.spot else ""),
        f"work: {e.images:,} images at {e.throughput:g} images/s per vCPU on {e.executor_vcpus} executor vCPUs "
        f"= {e.compute_h:.2f} h, plus {e.startup_h:.2f} h start-up",
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
