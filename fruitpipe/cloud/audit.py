"""`fruitpipe emr audit`: what may still be billing, region by region, and what the last 30 days cost.

Only describe/list/get calls: nothing is ever created, stopped or deleted. Each section is read on its own, so
a missing permission or a service absent from a region costs one line, never the rest of the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from fruitpipe.errors import FruitpipeError

from . import cost, queries
from .client import Aws, AwsError
from .commands import duration
from .config import EmrConfig

# Error codes meaning "these credentials may not do this" across the services audited.
_DENIED = frozenset({"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthorizationError",
                     "UnauthorizedException", "403"})
# Cost Explorer is a global service answered from us-east-1.
COST_EXPLORER_REGION = "us-east-1"


@dataclass(frozen=True)
class Section:
    """One kind of billable resource: how to list it (given a region's client and the account id), and the
    permission that needs."""

    title: str
    permission: str
    read: Callable[[Aws, str], list[str]]


def _since(start: datetime | None) -> str:
    return duration((datetime.now(timezone.utc) - start).total_seconds()) if start else "-"


def _emr_clusters(aws: Aws, _account: str) -> list[str]:
    return [f"{c['Id']} {c['Name']}: {c['Status']['State']} for "
            f"{_since(c['Status']['Timeline'].get('CreationDateTime'))}"
            for c in queries.clusters(aws, active_only=True)]


def _instances(aws: Aws, _account: str) -> list[str]:
    live = {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}
    lines = []
    for reservation in queries.items(aws, "ec2", "describe_instances", "Reservations", Filters=[live]):
        for i in reservation["Instances"]:
            tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
            note = " (stopped: its volumes still bill)" if i["State"]["Name"] == "stopped" else ""
            label = tags.get("Name") or tags.get("aws:elasticmapreduce:job-flow-id") or ""
            lines.append(_words(i["InstanceId"], i["InstanceType"], i["State"]["Name"], label) + note)
    return lines


def _volumes(aws: Aws, _account: str) -> list[str]:
    return [f"{v['VolumeId']} {v['Size']} GiB {v['VolumeType']} {v['State']}"
            + (" (not attached)" if v["State"] == "available" else "")
            for v in queries.items(aws, "ec2", "describe_volumes", "Volumes")]


def _snapshots(aws: Aws, account: str) -> list[str]:
    # The owner-id filter selects what OwnerIds=self does on AWS; moto honours only the filter.
    mine = {"Name": "owner-id", "Values": [account]}
    return [f"{s['SnapshotId']} of {s.get('VolumeSize', '?')} GiB, {s['State']}, taken {s['StartTime']:%Y-%m-%d}"
            for s in queries.items(aws, "ec2", "describe_snapshots", "Snapshots", OwnerIds=["self"], Filters=[mine])]


def _images(aws: Aws, _account: str) -> list[str]:
    return [_words(i["ImageId"], i.get("Name"), i["State"], "(its snapshots bill)")
            for i in aws.read("ec2", "describe_images", Owners=["self"]).get("Images", [])]


def _addresses(aws: Aws, _account: str) -> list[str]:
    return [a["PublicIp"] + ("" if a.get("AssociationId") else " (not associated)")
            for a in aws.read("ec2", "describe_addresses")["Addresses"]]


def _nat_gateways(aws: Aws, _account: str) -> list[str]:
    live = {"Name": "state", "Values": ["pending", "available"]}
    return [f"{n['NatGatewayId']} {n['State']} in {n.get('VpcId', '?')}, since {n['CreateTime']:%Y-%m-%d}"
            for n in queries.items(aws, "ec2", "describe_nat_gateways", "NatGateways", Filter=[live])]


def _load_balancers(aws: Aws, _account: str) -> list[str]:
    current = [f"{lb['LoadBalancerName']} ({lb['Type']}) {lb['State']['Code']}"
               for lb in queries.items(aws, "elbv2", "describe_load_balancers", "LoadBalancers")]
    classic = [f"{lb['LoadBalancerName']} (classic)"
               for lb in queries.items(aws, "elb", "describe_load_balancers", "LoadBalancerDescriptions")]
    return current + classic


def _rds(aws: Aws, _account: str) -> list[str]:
    return [f"{d['DBInstanceIdentifier']} {d['DBInstanceClass']} {d['Engine']} {d['DBInstanceStatus']}, "
            f"{d.get('AllocatedStorage', '?')} GiB"
            for d in queries.items(aws, "rds", "describe_db_instances", "DBInstances")]


def _eks(aws: Aws, _account: str) -> list[str]:
    return queries.items(aws, "eks", "list_clusters", "clusters")


def _efs(aws: Aws, _account: str) -> list[str]:
    return [_words(f["FileSystemId"], f.get("Name"), f"{f['LifeCycleState']},",
                   f"{f['SizeInBytes']['Value'] / 2**30:.3f} GiB")
            for f in queries.items(aws, "efs", "describe_file_systems", "FileSystems")]


def _words(*words: str | None) -> str:
    """The non-empty words joined by spaces (optional fields such as names may be missing)."""
    return " ".join(w for w in words if w)


SECTIONS = (
    Section("EMR clusters not terminated", "elasticmapreduce:ListClusters", _emr_clusters),
    Section("EC2 instances", "ec2:DescribeInstances", _instances),
    Section("EBS volumes", "ec2:DescribeVolumes", _volumes),
    Section("EBS snapshots (owned by this account)", "ec2:DescribeSnapshots", _snapshots),
    Section("private AMIs", "ec2:DescribeImages", _images),
    Section("Elastic IPs", "ec2:DescribeAddresses", _addresses),
    Section("NAT gateways (billed by the hour)", "ec2:DescribeNatGateways", _nat_gateways),
    Section("load balancers", "elasticloadbalancing:DescribeLoadBalancers", _load_balancers),
    Section("RDS instances", "rds:DescribeDBInstances", _rds),
    Section("EKS clusters", "eks:ListClusters", _eks),
    Section("EFS file systems", "elasticfilesystem:DescribeFileSystems", _efs),
)


def audit(config: EmrConfig, aws: Aws, *, all_regions: bool, costs: bool, max_objects: int) -> int:
    """Prints the billable resources of the configured region (or every region), the buckets, and with ``costs``
    the bill of the last 30 days per service."""
    account = queries.caller_identity(aws)["Account"]
    regions = _regions(aws) if all_regions else [config.region]
    print(f"billable resources of account {account} in {', '.join(regions)} (read only; nothing is changed):")
    found = 0
    for name in regions:
        print(f"{name}:")
        found += _audit_region(aws.in_region(name), account)
    print("S3 (all regions; S3 bills storage wherever it is):")
    found += _audit_buckets(aws, max_objects)
    if costs:
        _cost_table(aws.in_region(COST_EXPLORER_REGION), datetime.now(timezone.utc).date())
    print(f"{found} resource(s) listed")
    return 0


def _regions(aws: Aws) -> list[str]:
    """The regions enabled for the account (DescribeRegions lists only those by default)."""
    return sorted(r["RegionName"] for r in aws.read("ec2", "describe_regions")["Regions"])


def _audit_region(aws: Aws, account: str) -> int:
    found, empty = 0, []
    for section in SECTIONS:
        try:
            items = section.read(aws, account)
        except FruitpipeError as exc:
            print(f"  {section.title}: not readable ({_why(exc, section.permission)})")
            continue
        if not items:
            empty.append(section.title)
            continue
        print(f"  {section.title}: {len(items)}")
        for item in items:
            print(f"    {item}")
        found += len(items)
    if empty:
        print(f"  none: {', '.join(empty)}")
    return found


def _why(exc: FruitpipeError, permission: str) -> str:
    """One line saying why a section could not be read; a denial names the permission to grant."""
    if isinstance(exc, AwsError):
        if exc.code in _DENIED:
            return f"{exc.code}: these credentials lack {permission}"
        return exc.code
    return str(exc)


def _audit_buckets(aws: Aws, max_objects: int) -> int:
    try:
        buckets = aws.read("s3", "list_buckets").get("Buckets", [])
    except FruitpipeError as exc:
        print(f"  buckets: not readable ({_why(exc, 's3:ListAllMyBuckets')})")
        return 0
    print(f"  buckets: {len(buckets)}")
    for b in buckets:
        print(f"    {_bucket_summary(aws, b['Name'], max_objects)}")
    return len(buckets)


def _bucket_summary(aws: Aws, bucket: str, max_objects: int) -> str:
    try:
        region = queries.bucket_region(aws, bucket)
        count = size = 0
        capped = False
        for page in aws.pages("s3", "list_objects_v2", Bucket=bucket):
            for item in page.get("Contents", []):
                count += 1
                size += item["Size"]
            if count >= max_objects:
                capped = True
                break
    except AwsError as exc:
        return f"{bucket}: not readable ({exc.code})"
    amount = f"{'at least ' if capped else ''}{count} object(s), {size / 2**30:.3f} GiB"
    return f"{bucket} ({region}): {amount}"


def cost_request(today: date, days: int = cost.COST_EXPLORER_DAYS) -> dict[str, Any]:
    """GetCostAndUsage parameters: unblended cost per service over the ``days`` days before ``today``."""
    return {"TimePeriod": {"Start": (today - timedelta(days=days)).isoformat(), "End": today.isoformat()},
            "Granularity": "MONTHLY", "Metrics": ["UnblendedCost"],
            "GroupBy": [{"Type": "DIMENSION", "Key": "SERVICE"}]}


def _cost_table(aws: Aws, today: date) -> None:
    request = cost_request(today)
    period = request["TimePeriod"]
    title = f"costs per service, {period['Start']} to {period['End']} (Cost Explorer, unblended)"
    try:
        totals = _costs_per_service(aws, request)
    except FruitpipeError as exc:
        print(f"{title}: {_cost_explorer_problem(exc)}")
        return
    if not totals:
        print(f"{title}: no costs recorded")
        return
    print(f"{title}:")
    width = max(len(service) for service, _ in totals)
    for (service, unit), amount in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {service:<{width}}  {amount:>12,.2f} {unit}")
    for unit in sorted({unit for _, unit in totals}):
        total = sum(amount for (_, u), amount in totals.items() if u == unit)
        print(f"  {'total':<{width}}  {total:>12,.2f} {unit}")


def _costs_per_service(aws: Aws, request: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(service, currency) -> amount, summed over the periods Cost Explorer splits the range into."""
    totals: dict[tuple[str, str], float] = {}
    token = None
    while True:
        response = aws.read("ce", "get_cost_and_usage", **request, **({"NextPageToken": token} if token else {}))
        for period in response.get("ResultsByTime", []):
            for group in period.get("Groups", []):
                metric = group["Metrics"]["UnblendedCost"]
                key = (group["Keys"][0], metric.get("Unit", "USD"))
                totals[key] = totals.get(key, 0.0) + float(metric["Amount"])
        token = response.get("NextPageToken")
        if not token:
            return totals


def _cost_explorer_problem(exc: FruitpipeError) -> str:
    code = exc.code if isinstance(exc, AwsError) else None
    if code in _DENIED:
        return (f"not available ({code}): the credentials need ce:GetCostAndUsage, and Cost Explorer must be "
                "enabled for the account (once, in the Billing console)")
    if code == "DataUnavailableException":
        return ("no data (DataUnavailableException): Cost Explorer is not enabled for this account, or was enabled "
                "less than a day ago")
    return f"not available ({exc})"
