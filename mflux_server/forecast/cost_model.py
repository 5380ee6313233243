"""The cost model: how long a task keeps the engine busy, fitted to measured timings. Pure: no I/O, no clock."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Protocol

from mflux_server.core import catalog
from mflux_server.core.rows import Task, TimingStat
from mflux_server.core.settings import H100_STEP_COST
from mflux_server.forecast.numerics import (
    Coefficients,
    Point,
    fit_poly,
    fit_ratio,
    poly,
)

KINDS = ("step", "before", "after", "encode")

# Seconds per kind as a + b·mp + c·mp², mp = width·height / 2**20, used until the worker has measured
# anything. The step curve is FLUX.1-schnell bf16 measured on an H100 (0.58 s a step at 1024²); text
# encoding before the loop took 60–100 ms there, and a legacy VAE decode 0.07–0.2 s.
PRIOR: dict[str, Coefficients] = {
    "step": H100_STEP_COST,
    "before": (0.1, 0.0, 0.0),
    "after": (0.05, 0.15, 0.0),
    "encode": (0.01, 0.04, 0.0),
}
# A size measured this many times is forecast from its own mean rather than from the fitted curve.
MIN_SAMPLES_FOR_MEAN = 3
# The relative spread of one duration where nothing was measured (the prior is another machine's curve).
UNMEASURED_SPREAD = 0.25
# The share of a step's variance that one task's steps (and one queue's tasks) share rather than average out:
# the machine's state (clocks, heat, other work) moves them together. In the H100 runs of ../shared/data the
# run-to-run share of step-time variance had a median of 0.26 (0.0 to 1.0 across 27 model, size and precision
# pairs); noise that averages out over steps would make long tasks' ranges far too narrow.
RUN_CORRELATION = 0.3


def megapixels(width: int, height: int) -> float:
    """Pixel count in units of 2**20."""
    return width * height / 2**20


class TaskShape(Protocol):
    """What the cost of a task depends on: a Task, a QueueEntry, an Arrival or a NewTask."""

    @property
    def model(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def count(self) -> int: ...


class FitShape(enum.Enum):
    """The curve a kind's cost follows: the prior's shape scaled, or a polynomial of some degree."""

    SCALED_PRIOR = None
    CONSTANT = 0
    LINEAR = 1
    QUADRATIC = 2

    @property
    def parameters(self) -> int:
        """Free parameters of the curve."""
        return 1 if self.value is None else self.value + 1

    def fit(self, points: list[Point], prior: Coefficients) -> Coefficients | None:
        """Fit this curve to (mp, mean, weight) points."""
        return fit_ratio(points, prior) if self.value is None else fit_poly(points, self.value)


@dataclass
class KindModel:
    """The fitted cost of one kind (step, before, after, encode) for one model."""

    prior: Coefficients
    means: dict[float, tuple[float, int]] = field(default_factory=dict)  # mp -> (mean seconds, n)
    coef: Coefficients | None = None
    ratio: float | None = None
    shape: FitShape | None = None  # None: nothing measured, the prior as it is (scaled by ratio if known)
    # Relative variance of a measured duration around this fit, per measured size, and pooled over sizes.
    spreads: dict[float, float] = field(default_factory=dict)
    pooled_spread: float | None = None

    @classmethod
    def fit(cls, prior: Coefficients, samples: dict[float, tuple[float, int]]) -> KindModel:
        """Pick, by leave-one-out error over the measured sizes, the scaled prior or a polynomial of degree 0–2."""
        model = cls(prior=prior, means=samples)
        # Relative weights (we care about percentage error), damped in the sample count.
        points = [(mp, mean, math.sqrt(n) / mean**2) for mp, (mean, n) in samples.items() if mean > 0]
        if not points:
            return model
        scaled = fit_ratio(points, prior)
        model.ratio = poly(scaled, 1.0) / poly(prior, 1.0) if poly(prior, 1.0) else None
        best, best_error = FitShape.SCALED_PRIOR, None
        for shape in FitShape:
            if len(points) < shape.parameters + 1:
                continue  # too few sizes to judge this shape by leaving one out
            error = leave_one_out_error(points, partial(FitShape.fit, shape, prior=prior))
            if best_error is None or error < best_error * 0.98:  # a more complex shape must clearly win
                best, best_error = shape, error
        model.coef = best.fit(points, prior) or scaled
        model.shape = best
        return model

    def with_spread(self, squares: dict[float, float]) -> KindModel:
        """This fit with the relative variance of the measurements around it, from each size's mean square.

        The residual of a sample x against the prediction p is x − p, so its mean square is
        E[x²] − 2·p·mean + p²: the variance where p is the size's own mean, plus the fit's miss where it is not.
        """
        weighted = total = 0.0
        for mp, (mean, n) in self.means.items():
            predicted = self.seconds(mp)
            if mp not in squares or predicted <= 0:
                continue
            relative = max(squares[mp] - 2 * predicted * mean + predicted * predicted, 0.0) / predicted**2
            self.spreads[mp] = relative
            weighted, total = weighted + relative * n, total + n
        self.pooled_spread = weighted / total if total else None
        return self

    def relative_sd(self, mp: float) -> float:
        """The relative standard deviation of one duration at this pixel count: measured at this size, else pooled."""
        spread = self.spreads.get(mp, self.pooled_spread)
        return UNMEASURED_SPREAD if spread is None else math.sqrt(spread)

    def seconds(self, mp: float) -> float:
        """Predicted seconds at this pixel count."""
        measured = self.means.get(mp)
        if measured and measured[1] >= MIN_SAMPLES_FOR_MEAN:
            return measured[0]
        if self.coef is not None and self.means:
            # Inside the measured sizes, trust the fit. Beyond them, polynomials can run wild: carry the fit's
            # level at the nearest edge along the prior's shape, unless the fit's own curve stays within 2× of that.
            edge = min(max(mp, min(self.means)), max(self.means))
            fitted = poly(self.coef, edge)
            if fitted > 0:
                if edge == mp or poly(self.prior, edge) <= 0:
                    return fitted
                along_prior = fitted * poly(self.prior, mp) / poly(self.prior, edge)
                own = poly(self.coef, mp)
                return own if along_prior / 2 <= own <= along_prior * 2 else along_prior
        if self.ratio is not None:
            return poly(self.prior, mp) * self.ratio
        return poly(self.prior, mp)


def leave_one_out_error(points: list[Point], fitter: Callable[[list[Point]], Coefficients | None]) -> float:
    """Weighted squared relative error of predicting each point from a fit to all the others."""
    error = 0.0
    for i, (mp, mean, weight) in enumerate(points):
        coef = fitter(points[:i] + points[i + 1:])
        predicted = poly(coef, mp) if coef else -1.0
        error += weight * mean**2 * (((predicted - mean) / mean) ** 2 if predicted > 0 else 100.0)
    return error


def _means(sums: dict[float, tuple[float, int]]) -> dict[float, tuple[float, int]]:
    """(total seconds, n) per size as (mean, n), leaving out sizes with no samples."""
    return {mp: (total / n, n) for mp, (total, n) in sums.items() if n > 0}


def correlated_sd(sd: float, n: float) -> float:
    """The standard deviation of a sum of n durations of one sd each, sharing RUN_CORRELATION of their variance."""
    return n * sd * math.sqrt(RUN_CORRELATION + (1 - RUN_CORRELATION) / n) if n > 0 else 0.0


@cache
def family_of(model: str) -> str:
    """The catalog family of a served model name (a name, repo or folder); the name itself when unknown."""
    resolved = catalog.resolve_reference(model)
    return resolved.info.family if resolved else model


@dataclass
class CostModel:
    """Per model name, the fitted cost of each kind, with each family's pooled fit behind it; predicts durations.

    Models of one family share an architecture (schnell, dev and krea-dev; Z-Image and its turbo), so a model
    never run here is forecast from its siblings' measurements, and a model measured at a few sizes follows the
    shape its family learned at many: the family's fit is the prior its own measurements scale.
    """

    kinds: dict[str, dict[str, KindModel]]
    families: dict[str, dict[str, KindModel]]
    measured: bool
    # Per (model, width, height): each kind's seconds and the sd of one of its durations. A fitted model never
    # changes (a refit makes a new one), and a status request prices its task's size several times.
    _sizes: dict[tuple[str, int, int], tuple[dict[str, float], dict[str, float]]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def fit(cls, stats: Iterable[TimingStat]) -> CostModel:
        """Fit every (family, kind) and (model, kind) from aggregated timings; with none, the prior."""
        grouped: dict[tuple[str, str], dict[float, tuple[float, int]]] = {}
        squares: dict[tuple[str, str], dict[float, float]] = {}
        pooled: dict[tuple[str, str], dict[float, tuple[float, int]]] = {}
        pooled_sq: dict[tuple[str, str], dict[float, float]] = {}  # sums of squares, beside pooled's sums
        for stat in stats:
            if stat.n <= 0:
                continue
            mp = megapixels(stat.width, stat.height)
            grouped.setdefault((stat.model, stat.kind), {})[mp] = (stat.total / stat.n, stat.n)
            squares.setdefault((stat.model, stat.kind), {})[mp] = stat.total_sq / stat.n
            family_kind = (family_of(stat.model), stat.kind)
            sizes, sizes_sq = pooled.setdefault(family_kind, {}), pooled_sq.setdefault(family_kind, {})
            total, n = sizes.get(mp, (0.0, 0))
            sizes[mp] = (total + stat.total, n + stat.n)
            sizes_sq[mp] = sizes_sq.get(mp, 0.0) + stat.total_sq
        families: dict[str, dict[str, KindModel]] = {}
        for (family, kind), sums in pooled.items():
            squared = pooled_sq[(family, kind)]
            families.setdefault(family, {})[kind] = KindModel.fit(PRIOR[kind], _means(sums)).with_spread(
                {mp: squared[mp] / n for mp, (_, n) in sums.items() if n > 0})
        kinds: dict[str, dict[str, KindModel]] = {}
        for (model, kind), samples in grouped.items():
            # The shape comes from its siblings alone: a slower sibling measured at one size must not bend it.
            siblings: dict[float, tuple[float, int]] = {}
            for mp, (total, n) in pooled[(family_of(model), kind)].items():
                mean, own = samples.get(mp, (0.0, 0))
                siblings[mp] = (total - mean * own, n - own)
            shape = KindModel.fit(PRIOR[kind], _means(siblings)).coef or PRIOR[kind]
            kinds.setdefault(model, {})[kind] = KindModel.fit(shape, samples).with_spread(squares[(model, kind)])
        return cls(kinds=kinds, families=families, measured=bool(grouped))

    def kind(self, model: str, kind: str) -> KindModel:
        """The fitted cost of one kind: the model's own, else its family's, else the prior scaled to this machine."""
        fitted = self.kinds.get(model, {}).get(kind) or self.families.get(family_of(model), {}).get(kind)
        if fitted is not None:
            return fitted
        # Another family measured on this machine says more about its speed than the prior does.
        ratios = [r for m in self.families.values() if kind in m and (r := m[kind].ratio) is not None]
        ratio = sum(ratios) / len(ratios) if ratios else None
        return KindModel(prior=PRIOR[kind], ratio=ratio)

    def parts(self, model: str, width: int, height: int) -> dict[str, float]:
        """Seconds for one step and for each fixed cost, at this size (not to be changed: it is shared)."""
        return self._priced(model, width, height)[0]

    def _priced(self, model: str, width: int, height: int) -> tuple[dict[str, float], dict[str, float]]:
        """Each kind's seconds at this size, and the standard deviation of one duration of that kind."""
        key = (model, width, height)
        priced = self._sizes.get(key)
        if priced is None:
            mp = megapixels(width, height)
            fitted = {kind: self.kind(model, kind) for kind in KINDS}
            seconds = {kind: fitted[kind].seconds(mp) for kind in KINDS}
            priced = self._sizes[key] = (seconds, {kind: seconds[kind] * fitted[kind].relative_sd(mp) for kind in KINDS})
        return priced

    def gpu_seconds(self, task: TaskShape) -> float:
        """Seconds a task keeps the engine busy; encoding runs beside the next generation, so it is not here."""
        p = self.parts(task.model, task.width, task.height)
        return task.count * (p["before"] + task.steps * p["step"] + p["after"])

    def gpu_sd(self, task: TaskShape) -> float:
        """The standard deviation of a task's engine seconds, from the spread measured around each kind's fit."""
        sds = self._priced(task.model, task.width, task.height)[1]
        variance = 0.0
        for kind, n in (("step", task.count * task.steps), ("before", task.count), ("after", task.count)):
            variance += correlated_sd(sds[kind], n) ** 2
        return math.sqrt(variance)

    def task_seconds(self, task: TaskShape) -> float:
        """Seconds from a task's start until its images are stored: the generation, then its last encode."""
        return self.gpu_seconds(task) + self.parts(task.model, task.width, task.height)["encode"]

    def remaining_gpu_seconds(self, task: Task, now: float) -> float:
        """Seconds until a running task frees the engine, from its reported step and when that step finished."""
        p = self.parts(task.model, task.width, task.height)
        steps, step = task.steps, task.step
        elapsed = max(0.0, now - (task.step_at or task.started_at or now))
        if step <= 0:
            current = max(p["before"] + p["step"] - elapsed, 0.0) + (steps - 1) * p["step"] + p["after"]
        elif step < steps:
            current = max(p["step"] - elapsed, 0.0) + (steps - step - 1) * p["step"] + p["after"]
        else:
            current = max(p["after"] - elapsed, 0.0)
        later_images = max(task.count - task.image_index - 1, 0)
        return current + later_images * (p["before"] + steps * p["step"] + p["after"])

    def remaining_seconds(self, task: Task, now: float) -> float:
        """Seconds until a running task's images are stored."""
        return self.remaining_gpu_seconds(task, now) + self.parts(task.model, task.width, task.height)["encode"]
