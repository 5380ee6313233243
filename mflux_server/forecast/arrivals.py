"""Recent arrivals and the overtaking they predict: higher-priority tasks that will arrive while a task waits.

Pure: the queue view feeds it rows read through the store and the current time.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable
from typing import NamedTuple

from mflux_server.core.rows import Arrival
from mflux_server.forecast.cost_model import CostModel
from mflux_server.forecast.numerics import compound_poisson_quantile, poisson_quantile

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
    work_sq: float = 0.0  # squared engine seconds per second: how much overtakers' sizes vary


class ArrivalLog:
    """The arrivals of the last ARRIVAL_WINDOW seconds and, per model and priority, their load."""

    def __init__(self) -> None:
        # Oldest first by submit time (created_at need not grow with seq: clocks step), so the window is pruned
        # from the top; and how many of each model, priority and shape it holds, so that re-pricing the load
        # costs one price per shape, not a pass over every arrival (a submit flood keeps tens of thousands).
        self._arrivals: list[tuple[float, int, Arrival]] = []
        self._counts: Counter[tuple[str, int, int, int, int, int]] = Counter()
        self._samples: dict[tuple[str, int, int, int, int], Arrival] = {}  # one arrival of each shape, to price it
        self.last_seq = 0  # the newest arrival seen; the next read starts after it
        self._load: dict[str, dict[int, Load]] = {}
        self._starts: dict[tuple[str, int, int, float, float], float] = {}  # until_start's solutions for this load

    def observe(self, new: Iterable[Arrival], now: float, cost: CostModel) -> None:
        """Add new arrivals, forget old ones, and re-price every priority's load with the current cost model."""
        for arrival in new:
            heapq.heappush(self._arrivals, (arrival.created_at, arrival.seq, arrival))
            self._counts[_counted(arrival)] += 1
            self._samples.setdefault(_shape(arrival), arrival)
            self.last_seq = arrival.seq
        while self._arrivals and self._arrivals[0][0] < now - ARRIVAL_WINDOW:
            gone = _counted(heapq.heappop(self._arrivals)[2])
            self._counts[gone] -= 1
            if not self._counts[gone]:
                del self._counts[gone]
                shape = _shape_of(gone)
                if not any(_shape_of(counted) == shape for counted in self._counts):
                    del self._samples[shape]  # no arrival of that shape left in the window
        oldest = self._arrivals[0][0] if self._arrivals else now - ARRIVAL_WINDOW
        span = max(now - oldest, MIN_ARRIVAL_SPAN)
        # Priced with the current model every time: prices from an earlier model (the prior) would linger.
        prices: dict[tuple[str, int, int, int, int], float] = {}
        load: dict[str, dict[int, Load]] = {}
        for counted, count in self._counts.items():
            model, priority, shape = counted[0], counted[1], _shape_of(counted)
            seconds = prices.get(shape)
            if seconds is None:
                seconds = prices[shape] = cost.gpu_seconds(self._samples[shape])
            by_priority = load.setdefault(model, {})
            rate, work, work_sq = by_priority.get(priority, Load(0.0, 0.0))
            by_priority[priority] = Load(rate + count / span, work + count * seconds / span,
                                         work_sq + count * seconds * seconds / span)
        self._load = load
        self._starts = {}

    def overtaking_load(self, model: str, priority: int, workers: int) -> float:
        """Engine seconds per second of recent arrivals that would go ahead of a task with this priority."""
        load = sum(work for p, (_, work, _) in self._load.get(model, {}).items() if p > priority)
        return min(load / max(workers, 1), MAX_PRIORITY_LOAD)

    def until_start(self, model: str, priority: int, workers: int, ahead: float,
                    quantile: float = OVERTAKING_QUANTILE) -> float:
        """Seconds until a task starts: the work ahead now plus a low percentile of the later arrivals that overtake it
        (another `quantile` for the ends of the forecast's range).

        Solved once per 0.1% of `ahead` and remembered until the next observe(): the fixed point takes dozens
        of steps near the load cap, and every status request asks (bench/explanations.md). Within a bucket the
        start is scaled in proportion to `ahead` (it grows about as ahead ÷ (1 − load)), off by well under 0.1%.
        """
        if ahead <= 0:
            return ahead
        starts = self._starts  # read once: observe() replaces it together with the load it was solved for
        bucket = float(f"{ahead:.3g}")
        key = (model, priority, workers, bucket, quantile)
        start = starts.get(key)
        if start is None:
            start = starts[key] = self._solve(model, priority, workers, bucket, quantile)
        return start * ahead / bucket

    def _solve(self, model: str, priority: int, workers: int, ahead: float, quantile: float) -> float:
        overtakers = [load for p, load in self._load.get(model, {}).items() if p > priority]
        rate = sum(load.rate for load in overtakers) / max(workers, 1)
        if rate <= 0 or ahead <= 0:
            return ahead
        # Mean engine seconds per overtaker, from the capped load; then T = ahead + quantile(Poisson(rate·T))·mean
        # is found by iterating upwards from T = ahead, which converges because the load is below 1.
        mean_seconds = self.overtaking_load(model, priority, workers) / rate
        sd_seconds = 0.0
        if quantile != OVERTAKING_QUANTILE:  # the range: the overtakers' sizes vary as well as their number
            raw_rate, raw_work = sum(load.rate for load in overtakers), sum(load.work for load in overtakers)
            mean_square = sum(load.work_sq for load in overtakers) / raw_rate
            scale = mean_seconds / (raw_work / raw_rate) if raw_work > 0 else 1.0  # as capped as the mean
            sd_seconds = math.sqrt(max(mean_square - (raw_work / raw_rate) ** 2, 0.0)) * scale
        start = ahead
        for _ in range(64):
            # Rounded so the cache of quantiles stays small; a thousandth of an arrival changes nothing.
            expected = round(rate * start, 3)
            if quantile == OVERTAKING_QUANTILE:  # the point forecast: a count quantile (bench/explanations.md)
                later = poisson_quantile(expected, quantile) * mean_seconds
            else:
                later = compound_poisson_quantile(expected, mean_seconds, sd_seconds, quantile)
            if ahead + later <= start:
                break
            start = ahead + later
        return start


def _shape(arrival: Arrival) -> tuple[str, int, int, int, int]:
    return arrival.model, arrival.width, arrival.height, arrival.steps, arrival.count


def _shape_of(counted: tuple[str, int, int, int, int, int]) -> tuple[str, int, int, int, int]:
    return counted[0], counted[2], counted[3], counted[4], counted[5]


def _counted(arrival: Arrival) -> tuple[str, int, int, int, int, int]:
    return arrival.model, arrival.priority, arrival.width, arrival.height, arrival.steps, arrival.count
