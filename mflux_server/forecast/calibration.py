"""The range's calibration: what recent tasks took against their forecasts, so that four in five hold. Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from mflux_server.core.rows import ForecastOutcome
from mflux_server.forecast.ranges import HIGH_QUANTILE, LOW_QUANTILE

# The latest finished tasks it learns from, and how many it needs before it replaces the model's range.
CALIBRATION_TASKS = 200
MIN_CALIBRATION_TASKS = 20


@dataclass(frozen=True)
class Calibration:
    """The 10th and 90th percentiles of what recent tasks took as a share of their forecast at submit.

    Split conformal prediction on that ratio: the ⌊(n + 1)·0.1⌋-th smallest of n recent ratios is below the next
    task's ratio at least nine times in ten, and the ⌈(n + 1)·0.9⌉-th smallest above it nine times in ten, while the
    server's use stays alike. So once enough tasks have finished, a forecast's range is the forecast times those
    two ratios: it holds about four tasks in five by construction, whatever the model leaves out (arrivals of
    other models falling due first, cancellations ahead, a burst) or overstates. Until then the model's own range
    (engine spread, overtaking arrivals, loads: ranges.py) stands. Measured on benchmark 14's steady trace, the
    model's range calibrated end by end held as often but was twice as wide (62% of the forecast against 32%):
    its shape adds up worst cases that rarely come together.
    """

    low_ratio: float = 0.0
    high_ratio: float = 0.0
    tasks: int = 0

    @property
    def ready(self) -> bool:
        """Whether enough tasks have finished to replace the model's range."""
        return self.tasks >= MIN_CALIBRATION_TASKS

    @classmethod
    def of(cls, outcomes: Iterable[ForecastOutcome]) -> Calibration:
        """The ratios that bound these outcomes' next one at each end; none with too few of them."""
        ratios = sorted(o.took / o.point for o in outcomes if o.point > 0)
        n = len(ratios)
        if n < MIN_CALIBRATION_TASKS:
            return cls(0.0, 0.0, n)
        low = ratios[max(math.floor((n + 1) * LOW_QUANTILE), 1) - 1]
        high = ratios[min(math.ceil((n + 1) * HIGH_QUANTILE), n) - 1]
        return cls(low, high, n)

    def applied(self, point: float, low: float, high: float) -> tuple[float, float]:
        """The range for a forecast: the model's (low, high) until calibrated, then the forecast times the two
        ratios; it always holds the forecast itself and never goes below 0."""
        if self.ready:
            low, high = point * self.low_ratio, point * self.high_ratio
        return max(min(low, point), 0.0), max(high, point)
