"""Recent arrivals and the overtaking they predict: higher-priority tasks that will arrive while a task waits.

Pure: the queue view feeds it rows read through the store and the current time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

from mflux_server.core.rows import Arrival
from mflux_server.forecast.cost_model import CostModel
from mflux_server.forecast.numerics import poisson_quantile

# From the last ARRIVAL_WINDOW seconds of submissions we know each priority's rate and mean engine time; a
# waiting task's forecast adds the OVERTAKING_QUANTILE-th percentile of the Poisson number of higher-priority
# arrivals during its wait, times their mean time. Overtaking work is skewed (often little, sometimes much:
# sizes vary and every overtaker lengthens the wait), and the forecast with the smallest expected relative
# error of a skewed quantity lies below its median: on the benchmark trace the 30th percentile cut the error
# at submit from 9.7% to 8.6% (bench/explanations.md). Their load is capped so a burst cannot make
# forecasts explode.
OVERTAKING_QUANTILE = 0.3
ARRIVAL_WINDOW = 600.0
MIN_ARRIVAL_SPAN = 30.0
MAX_PRIORITY_LOAD = 0.8


class Load(NamedTuple):
    """Recent arrivals of one model and priority, per second."""

    rate: float  # arrivals per second
    work: float  # engine seconds per second


class ArrivalLog:
    """The arrivals of the last ARRIVAL_WINDOW seconds and, per model and priority, their load."""

    def __init__(self) -> None:
        self._arrivals: deque[Arrival] = deque()
        self.last_seq = 0  # the newest arrival seen; the next read starts after it
        self._load: dict[str, dict[int, Load]] = {}
        self._starts: dict[tuple[str, int, int, float], float] = {}  # until_start's solutions for this load

    def observe(self, new: Iterable[Arrival], now: float, cost: CostModel) -> None:
        """Add new arrivals, forget old ones, and re-price every priority's load with the current cost model."""
        for arrival in new:
            self._arrivals.append(arrival)
            self.last_seq = arrival.seq
        # created_at need not grow with seq (clocks step), so prune and measure by time, not by position.
        self._arrivals = deque(a for a in self._arrivals if a.created_at >= now - ARRIVAL_WINDOW)
        oldest = min((a.created_at for a in self._arrivals), default=now - ARRIVAL_WINDOW)
        span = max(now - oldest, MIN_ARRIVAL_SPAN)
        # Priced with the current model every time: prices from an earlier model (the prior) would linger.
        prices: dict[tuple[str, int, int, int, int], float] = {}
        load: dict[str, dict[int, Load]] = {}
        for arrival in self._arrivals:
            shape = (arrival.model, arrival.width, arrival.height, arrival.steps, arrival.count)
            seconds = prices.get(shape)
            if seconds is None:
                seconds = prices[shape] = cost.gpu_seconds(arrival)
            by_priority = load.setdefault(arrival.model, {})
            rate, work = by_priority.get(arrival.priority, Load(0.0, 0.0))
            by_priority[arrival.priority] = Load(rate + 1 / span, work + seconds / span)
        self._load = load
        self._starts = {}

    def overtaking_load(self, model: str, priority: int, workers: int) -> float:
        """Engine seconds per second of recent arrivals that would go ahead of a task with this priority."""
        load = sum(work for p, (_, work) in self._load.get(model, {}).items() if p > priority)
        return min(load / max(workers, 1), MAX_PRIORITY_LOAD)

    def until_start(self, model: str, priority: int, workers: int, ahead: float) -> float:
        """Seconds until a task starts: the work ahead now plus a low percentile of the later arrivals that overtake it.

        Solved once per 0.1% of `ahead` and remembered until the next observe(): the fixed point takes dozens
        of steps near the load cap, and every status request asks (bench/explanations.md). Within a bucket the
        start is scaled in proportion to `ahead` (it grows about as ahead ÷ (1 − load)), off by well under 0.1%.
        """
        if ahead <= 0:
            return ahead
        starts = self._starts  # read once: observe() replaces it together with the load it was solved for
        bucket = float(f"{ahead:.3g}")
        key = (model, priority, workers, bucket)
        start = starts.get(key)
        if start is None:
            start = starts[key] = self._solve(model, priority, workers, bucket)
        return start * ahead / bucket

    def _solve(self, model: str, priority: int, workers: int, ahead: float) -> float:
        rate = sum(r for p, (r, _) in self._load.get(model, {}).items() if p > priority) / max(workers, 1)
        if rate <= 0 or ahead <= 0:
            return ahead
        # Mean engine seconds per overtaker, from the capped load; then T = ahead + quantile(Poisson(rate·T))·mean
        # is found by iterating upwards from T = ahead, which converges because the load is below 1.
        mean_seconds = self.overtaking_load(model, priority, workers) / rate
        start = ahead
        for _ in range(64):
            # Rounded so the cache of quantiles stays small; a thousandth of an arrival changes nothing.
            later = poisson_quantile(round(rate * start, 3), OVERTAKING_QUANTILE) * mean_seconds
            if ahead + later <= start:
                break
            start = ahead + later
        return start
