"""Writing docs/benchmarks.md from the results."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from bench.results import Result

TARGETS_MISSED_HELP = "Where a target is missed, the section below it says why; targets are never loosened."


def render(results: list[Result], machine: str, command: str, plot: str | None, explanations: dict[str, str]) -> str:
    """The whole benchmarks page as Markdown."""
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{command}` on {when}.",
        "",
        f"Machine: {machine}.",
        "",
        "Every figure comes from the real processes: the API under gunicorn on loopback, and `mflux-worker "
        "--engine synthetic` (sleep-based steps that release the GIL, as MLX evaluation does) on a real SQLite "
        "file. How each benchmark works is in [bench/README.md](../bench/README.md). " + TARGETS_MISSED_HELP,
        "",
        "| benchmark | figure | value | target | met |",
        "|---|---|---|---|---|",
    ]
    for result in results:
        for figure in result.figures:
            met = "" if figure.met is None else ("yes" if figure.met else "**no**")
            lines.append(f"| {result.name} | {figure.label} | {figure.shown()} | {figure.target} | {met} |")
    for result in results:
        lines += ["", f"## {result.name}", "", f"Command: `{result.command}`", ""]
        for figure in result.figures:
            target = f" (target {figure.target}: {'met' if figure.met else 'MISSED'})" if figure.target else ""
            lines.append(f"- {figure.label}: **{figure.shown()}**{target}")
        for note in result.notes:
            lines += ["", note]
        if result.name in explanations:
            lines += ["", explanations[result.name]]
        if result.name == "Forecast accuracy" and plot:
            lines += ["", f"![forecast against actual time]({plot})"]
    # Sections of bench/explanations.md that belong to no benchmark (history, comparisons) close the page.
    names = {result.name for result in results}
    for name, text in explanations.items():
        if name not in names:
            lines += ["", f"## {name}", "", text]
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> None:
    """Write the page, creating docs/ if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def machine() -> str:
    """One line about the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        memory = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        memory = "RAM unknown"
    return (f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} cores, {memory}, "
            f"Python {platform.python_version()}")
