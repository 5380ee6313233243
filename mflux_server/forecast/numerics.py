"""Small numerics for the cost model: polynomials, weighted least squares, Poisson quantiles. No I/O."""

from __future__ import annotations

import functools
import math
from statistics import NormalDist

Coefficients = tuple[float, float, float]  # (a, b, c) of a + b·x + c·x²
Point = tuple[float, float, float]  # (x, mean, weight)


def poly(coef: Coefficients, x: float) -> float:
    """a + b·x + c·x²."""
    return coef[0] + coef[1] * x + coef[2] * x * x


def solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """Solve a small linear system by Gaussian elimination with partial pivoting; None when singular."""
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            factor = a[r][col] / a[col][col]
            for c in range(col, n + 1):
                a[r][c] -= factor * a[col][c]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][c] * out[c] for c in range(r + 1, n))) / a[r][r]
    return out


def fit_poly(points: list[Point], degree: int) -> Coefficients | None:
    """Weighted least squares of mean on 1, x, … x^degree; coefficients padded to (a, b, c); None if singular."""
    size = degree + 1
    m = [[0.0] * size for _ in range(size)]
    v = [0.0] * size
    for x, mean, weight in points:
        powers = [x**k for k in range(size)]
        for i in range(size):
            v[i] += weight * powers[i] * mean
            for j in range(size):
                m[i][j] += weight * powers[i] * powers[j]
    solved = solve(m, v)
    if solved is None:
        return None
    padded = solved + [0.0] * (3 - size)
    return (padded[0], padded[1], padded[2])


def fit_ratio(points: list[Point], prior: Coefficients) -> Coefficients:
    """The prior's shape, scaled by the weighted mean ratio of the measurements to it."""
    ratios = [(mean / poly(prior, x), weight) for x, mean, weight in points if poly(prior, x) > 0]
    ratio = sum(r * w for r, w in ratios) / sum(w for _, w in ratios) if ratios else 1.0
    return (prior[0] * ratio, prior[1] * ratio, prior[2] * ratio)


@functools.lru_cache(maxsize=4096)
def poisson_quantile(mean: float, q: float) -> int:
    """The smallest k with P(Poisson(mean) <= k) >= q (exact up to a mean of 200, normal approximation above)."""
    if mean <= 0:
        return 0
    if mean > 200:
        return max(int(mean + NormalDist().inv_cdf(q) * math.sqrt(mean) + 0.5), 0)
    term = cumulative = math.exp(-mean)
    k = 0
    while cumulative < q:
        k += 1
        term *= mean / k
        cumulative += term
    return k


@functools.lru_cache(maxsize=64)
def normal_quantile(q: float) -> float:
    """The standard normal distribution's q-quantile."""
    return NormalDist().inv_cdf(q)


def compound_poisson_quantile(expected: float, mean: float, sd: float, q: float) -> float:
    """The q-quantile of a sum of Poisson(expected) many values of this mean and sd (a gamma of the same mean and
    variance, by Wilson and Hilferty's approximation: skewed like the sum when few are expected, normal when many)."""
    if expected <= 0 or mean <= 0:
        return 0.0
    total, variance = expected * mean, expected * (mean * mean + sd * sd)
    shape = total * total / variance
    cube = 1 - 1 / (9 * shape) + normal_quantile(q) / (3 * math.sqrt(shape))
    return total * max(cube, 0.0) ** 3
