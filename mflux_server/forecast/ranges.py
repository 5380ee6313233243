"""The forecast's range: each source of uncertainty as a point with its 10th and 90th percentiles, combined. Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

from mflux_server.forecast.numerics import normal_quantile

# The range is [p10, p90]: four tasks in five should finish inside it.
LOW_QUANTILE, HIGH_QUANTILE = 0.1, 0.9
# The relative spread of a model load or a LoRA change: the server keeps their means only, and a load varies
# with the disk cache (a warm reload can take a third of a cold one).
LOAD_SPREAD = 0.3


class Part(NamedTuple):
    """One source of a forecast's uncertainty: the seconds it adds to the point forecast, and its p10 and p90."""

    point: float
    low: float
    high: float


def normal(seconds: float, sd: float) -> Part:
    """A duration whose own uncertainty is about normal with this standard deviation (never below zero)."""
    z = normal_quantile(HIGH_QUANTILE)
    return Part(seconds, max(seconds - z * sd, 0.0), seconds + z * sd)


def combined(point: float, parts: Iterable[Part]) -> tuple[float, float]:
    """[p10, p90] of a sum of independent parts around its point forecast.

    Each side's distance is the root of the sum of the parts' squared distances on that side, as for independent
    normal parts; the parts here are skewed (overtaking is), so each side keeps its own.
    """
    down = up = 0.0
    for part in parts:
        down += max(part.point - part.low, 0.0) ** 2
        up += max(part.high - part.point, 0.0) ** 2
    return max(point - math.sqrt(down), 0.0), point + math.sqrt(up)
