"""The range's calibration: recent ranges checked against what their tasks took, so that four in five hold. Pure."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from mflux_server.core.rows import ForecastOutcome
from mflux_server.forecast.ranges import HIGH_QUANTILE, LOW_QUANTILE

# The latest finished tasks it learns from, and how many it needs before it corrects anything.
CALIBRATION_TASKS = 200
MIN_CALIBRATION_TASKS = 20


@dataclass(frozen=True)
class Calibration:
    """How much to move each end of the model's range outwards (or inwards), as a share of the point forecast.

    Split conformal prediction, one side at a time, since the range claims a 10th and a 90th percentile: each
    recent task's low score is how far (relative to its forecast) the time it took fell below the low end the model
    gave it at submit, its high score how far above the high end (negative: inside, by that much). Moving each end
    by the 90th percentile of its scores would have left one task in ten below the range and one in ten above it,
    and does so for the next tasks while the server's use stays alike. It corrects what the model leaves out
    (arrivals of other models falling due first, cancellations ahead, a burst) and what it overstates.
    """

    low_margin: float = 0.0
    high_margin: float = 0.0
    tasks: int = 0

    @classmethod
    def of(cls, outcomes: Iterable[ForecastOutcome]) -> Calibration:
        """The margins that would have held these outcomes' ends; none with too few of them."""
        known = [o for o in outcomes if o.point > 0]
        if len(known) < MIN_CALIBRATION_TASKS:
            return cls(0.0, 0.0, len(known))
        lows = sorted((o.low - o.took) / o.point for o in known)
        highs = sorted((o.took - o.high) / o.point for o in known)
        # The conformal quantile: the ⌈(n + 1)·q⌉-th smallest score bounds at least a share q of the next task's
        # (q = 0.9 at each end: one in ten beyond it).
        def bound(scores: list[float], share: float) -> float:
            return scores[min(math.ceil((len(scores) + 1) * share), len(scores)) - 1]

        return cls(bound(lows, 1 - LOW_QUANTILE), bound(highs, HIGH_QUANTILE), len(known))

    def applied(self, point: float, low: float, high: float) -> tuple[float, float]:
        """The range with each end moved by its margin; moved in no further than the point, never below 0."""
        return max(min(low - self.low_margin * point, point), 0.0), max(high + self.high_margin * point, point)
