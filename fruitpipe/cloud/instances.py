"""The EC2 instance types fruitpipe sizes Spark for and prices: what each node offers to YARN."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceType:
    vcpus: int
    memory_gib: int
    # EMR's default yarn.nodemanager.resource.memory-mb for the type: all a node's containers may use.
    yarn_memory_mb: int


# vCPU and memory from the EC2 instance-type pages; YARN memory from the EMR Release Guide's
# "Task configuration" defaults (https://docs.aws.amazon.com/emr/latest/ReleaseGuide/emr-hadoop-task-config.html).
INSTANCE_TYPES: dict[str, InstanceType] = {
    "m5.xlarge": InstanceType(vcpus=4, memory_gib=16, yarn_memory_mb=12288),
    "m5.2xlarge": InstanceType(vcpus=8, memory_gib=32, yarn_memory_mb=24576),
    "m5.4xlarge": InstanceType(vcpus=16, memory_gib=64, yarn_memory_mb=57344),
    "c5.xlarge": InstanceType(vcpus=4, memory_gib=8, yarn_memory_mb=6144),
    "c5.2xlarge": InstanceType(vcpus=8, memory_gib=16, yarn_memory_mb=12288),
    "c5.4xlarge": InstanceType(vcpus=16, memory_gib=32, yarn_memory_mb=24576),
    "r5.xlarge": InstanceType(vcpus=4, memory_gib=32, yarn_memory_mb=24576),
    "r5.2xlarge": InstanceType(vcpus=8, memory_gib=64, yarn_memory_mb=57344),
    "r5.4xlarge": InstanceType(vcpus=16, memory_gib=128, yarn_memory_mb=122880),
}
