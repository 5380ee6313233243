"""A benchmark's figures, each with its target, and percentiles."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0–100) by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


@dataclass
class Figure:
    """One measured number, how it is shown, and the target it must meet (if any)."""

    label: str
    value: float
    unit: str = ""
    target: str = ""
    met: bool | None = None

    def shown(self) -> str:
        """The value with its unit."""
        if self.unit == "%":
            return f"{self.value:.2f}%"
        if self.unit == "ms":
            return f"{self.value:.2f} ms"
        if self.unit == "MB":
            return f"{self.value:.1f} MB"
        if self.unit == "/s":
            return f"{self.value:,.0f}/s"
        if self.unit == "×":
            return f"{self.value:.2f}×"
        return f"{self.value:g}{self.unit}"


@dataclass
class Result:
    """What one benchmark found."""

    name: str
    command: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def add(self, label: str, value: float, unit: str = "", target: str = "", met: bool | None = None) -> None:
        """Record one figure."""
        self.figures.append(Figure(label, value, unit, target, met))

    @property
    def met(self) -> bool:
        """True when every figure with a target meets it."""
        return all(f.met is not False for f in self.figures)
