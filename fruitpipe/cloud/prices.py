"""Dated price table for `fruitpipe emr cost`: EU (Ireland) on-demand rates, USD per instance-hour.

Transcribed by hand, never fetched live: prices change and this table does not follow them. Re-check both
source pages before relying on an estimate, and update AS_OF together with the numbers.
"""

from __future__ import annotations

AS_OF = "2026-11-25"
REGION = "eu-west-1"
SOURCES = (
    "EC2: https://aws.amazon.com/ec2/pricing/on-demand/ (Linux, EU (Ireland))",
    "EMR: https://aws.amazon.com/emr/pricing/ (Amazon EMR on Amazon EC2, EU (Ireland))",
)

# instance type -> (EC2 on-demand Linux, EMR surcharge), USD per hour.
USD_PER_HOUR: dict[str, tuple[float, float]] = {
    "m5.xlarge": (0.214, 0.048),
    "m5.2xlarge": (0.428, 0.096),
    "m5.4xlarge": (0.856, 0.192),
    "c5.xlarge": (0.192, 0.043),
    "c5.2xlarge": (0.384, 0.085),
    "c5.4xlarge": (0.768, 0.170),
    "r5.xlarge": (0.282, 0.063),
    "r5.2xlarge": (0.564, 0.126),
    "r5.4xlarge": (1.128, 0.252),
}

# Fixed conversion for the € column, euros per US dollar, set AS_OF; not a live exchange rate.
EUR_PER_USD = 0.86
