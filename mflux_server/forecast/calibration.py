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
    """How much to widen (or narrow) the model's range on each side, as a share of the point forecast.

    Split conformal prediction: each recent task's score is how far (relative to its forecast) the time it took
    fell outside the range the model gave it at submit (negative: inside, by that much). Widening every range by
    the 80th percentile of those scores would have held four tasks in five of them, and holds as many of the next
    ones while the server's use stays alike. It corrects what the model leaves out (arrivals of other models that
    fall due first, cancellations ahead, a burst) and what it overstates, without knowing which.
    """

    margin: float = 0.0
    tasks: int = 0

    @classmethod
    def of(cls, outcomes: Iterable[ForecastOutcome]) -> Calibration:
        """The margin that would have held four in five of these outcomes; none with too few of them."""
        scores = sorted(max(o.low - o.took, o.took - o.high) / o.point for o in outcomes if o.point > 0)
        if len(scores) < MIN_CALIBRATION_TASKS:
            return cls(0.0, len(scores))
        # The conformal quantile: the ⌈(n + 1)·0.8⌉-th smallest score, which covers at least 80% of the next task.
        rank = min(math.ceil((len(scores) + 1) * (HIGH_QUANTILE - LOW_QUANTILE)), len(scores))
        return cls(scores[rank - 1], len(scores))

    def applied(self, point: float, low: float, high: float) -> tuple[float, float]:
        """The range widened by the margin on each side; narrowed no further than the point itself, never below 0."""
        shift = self.margin * point
        return max(min(low - shift, point), 0.0), max(high + shift, point)
