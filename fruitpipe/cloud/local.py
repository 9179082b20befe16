"""The `fruitpipe emr` commands that need no AWS client: they work from the config alone, so they run without
boto3 (a driver extra) and without an account.
"""

from __future__ import annotations

import json
import sys

from . import cost, specs
from .config import EmrConfig

DEFAULT_ESTIMATE_IMAGES = 10_000


def estimate(config: EmrConfig, images: int | None, throughput: float | None, startup_minutes: float) -> int:
    """Prints what a run of ``images`` images would cost on the configured cluster."""
    images = DEFAULT_ESTIMATE_IMAGES if images is None else images
    print(cost.format_estimate(config, cost.estimate(config, images, throughput, startup_minutes)))
    return 0


def policy(config: EmrConfig) -> int:
    """Prints the least-privilege policy for the nodes' role, and where to attach it."""
    print(json.dumps(specs.job_role_policy(config), indent=2))
    print(f"attach it to the role of the instance profile in emr.instance_profile ({config.instance_profile}) "
          "in place of AmazonElasticMapReduceforEC2Role", file=sys.stderr)
    return 0
