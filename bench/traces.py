"""Traces for the forecast-range benchmark: steady, model switching, and real use on an H100's measured costs."""

from __future__ import annotations

import csv
import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import forecast_accuracy, model_switching
from mflux_server.forecast.numerics import fit_poly
from mflux_server.testing import ROOT

DATA = ROOT / "bench" / "data"  # copied from ../shared/data (bench/data/README.md)
# The families measured on an H100 (../shared/data), the model each is served as, and its typical steps.
FAMILIES = {"schnell": ("flux1", (4, 4)), "zimage": ("z-image-turbo", (8, 9)), "klein4b": ("flux2-klein-4b", (4, 6)),
            "qwen": ("qwen-image", (12, 20))}
# Bytes of weights each keeps resident (families-h100.md; FLUX.1 from flux1-h100-summary): a load reads them
# from disk at LOAD_RATE. The runs built random weights in memory, so their load_s is not a disk load.
RESIDENT_GIB = {"schnell": 23.8, "zimage": 19.1, "klein4b": 14.9, "qwen": 51.5}
LOAD_RATE_GIB = 2.0
# The run-to-run drift of a whole image and the per-step noise, as the H100 runs show for bf16 (median
# run-mean spread about 1-4%, steps 2-10%: tests of the spread in cost_model.RUN_CORRELATION).
DRIFT, NOISE = 0.04, 0.05


@dataclass
class Trace:
    """A trace: timed actions in model seconds, and how to run the worker that serves it."""

    name: str
    actions: list[tuple[float, dict[str, Any]]]  # (at, {"submit": body} | {"cancel": "waiting" | "running"})
    speed: float
    worker_args: list[str]
    description: str
    profiles: dict[str, Any] = field(default_factory=dict)  # written to a file for --synthetic-profiles


def _median(rows: list[dict[str, str]], column: str) -> float:
    return statistics.median(float(r[column]) for r in rows)


def h100_profiles() -> dict[str, dict[str, Any]]:
    """Per-model synthetic timings fitted to the H100 measurements: steps a + b·mp + c·mp², text encoding before,
    the VAE decode after (the path --vae-decode auto takes with an H100's memory), load, and the cold first image."""
    rows: dict[str, list[dict[str, str]]] = {}
    for name in ("families-h100-timings.csv", "flux1-h100-timings-raw.csv"):
        with open(DATA / name) as handle:
            for row in csv.DictReader(handle):
                family = row.get("family") or row["model"]
                if family in FAMILIES and not row.get("error") and row["label"] in ("h100-bf16", "bf16",
                                                                                    "h100-bf16-vaemodes", "h100-bf16-vaetiling"):
                    rows.setdefault(family, []).append(row)
    profiles = {}
    for family, (model, _) in FAMILIES.items():
        warm = [r for r in rows[family] if r["warmup"] == "0"]
        sizes = sorted({float(r["mp"]) for r in warm})
        points = [(mp, _median([r for r in warm if float(r["mp"]) == mp], "step_rest_mean_s"), 1.0) for mp in sizes]
        coef = fit_poly(points, min(2, len(points) - 1)) or (points[0][1], 0.0, 0.0)
        legacy = [r for r in warm if float(r["vae_s"]) < 1.0]  # the low_memory decode path is not the one taken
        # A load's first image pays for compiling its kernels at its size: first step over the rest, in warm-up
        # runs after the very first one (which compiled everything, tens of seconds, and counts as load time).
        cold = [float(r["step_first_s"]) - float(r["step_rest_mean_s"]) for r in rows[family]
                if r["warmup"] == "1" and float(r["step_first_s"]) < 5]
        profiles[model] = {"step": [max(c, 0.0) for c in coef], "fixed": [_median(warm, "text_s"), _median(legacy, "vae_s")],
                           "load": RESIDENT_GIB[family] / LOAD_RATE_GIB, "cold": max(statistics.median(cold), 0.0),
                           "drift": DRIFT}
    return profiles


def steady(n: int) -> Trace:
    """Benchmark 4's trace: mixed sizes, steps and counts, 20% priority, Poisson arrivals at load 0.9."""
    rnd = random.Random(11)
    tasks = forecast_accuracy.make_trace(n, rnd)
    speed = 150.0
    mean = sum(forecast_accuracy.true_seconds(t, 1.0) for t in tasks) / n
    at, actions = 0.0, []
    for task in tasks:
        at += rnd.expovariate(forecast_accuracy.LOAD / mean)
        actions.append((at, {"submit": task}))
    args = ["--synthetic-step", ",".join(map(str, forecast_accuracy.STEP)), "--synthetic-fixed",
            ",".join(map(str, forecast_accuracy.FIXED)), "--synthetic-noise", str(forecast_accuracy.NOISE)]
    return Trace("steady", actions, speed, args, f"{n} tasks of benchmark 4 (mixed sizes, steps 2-30, count 1-4, "
                                               f"20% priority), load {forecast_accuracy.LOAD:g}, ÷{speed:g}")


def switching(n: int) -> Trace:
    """Benchmark 6's trace: schnell and dev on one worker, a 15 s load, Poisson arrivals at load 0.7."""
    speed = 20.0
    actions = [(at, {"submit": {"prompt": f"switching {i}", "model": model, "width": 1024, "height": 1024,
                                "steps": model_switching.STEPS, "format": "JPEG"}})
               for i, (at, model) in enumerate(model_switching.make_trace(n, random.Random(5)))]
    args = ["--models", "schnell,dev", "--max-affinity-wait", str(model_switching.AFFINITY / speed),
            "--synthetic-load", str(model_switching.LOAD_SECONDS), "--synthetic-step", f"{model_switching.STEP_SECONDS},0,0",
            "--synthetic-fixed", ",".join(map(str, model_switching.FIXED)), "--synthetic-noise", str(model_switching.NOISE)]
    return Trace("switching", actions, speed, args, f"{n} tasks of benchmark 6 (schnell and dev on one worker, "
                                                   f"15 s loads), load {model_switching.LOAD:g}, ÷{speed:g}")


def h100(n: int, load: float = 0.75, speed: float = 4.0) -> Trace:
    """Real use on an H100's measured costs: four families on one worker, sizes 512-1536, count 1-4, 20% priority,
    5% of waiting and 3% of running tasks canceled, and a quiet minute then a burst of 20 in the middle."""
    rnd = random.Random(23)
    profiles = h100_profiles()
    models = {model: steps for model, steps in FAMILIES.values()}
    weights = {"flux1": 0.35, "z-image-turbo": 0.3, "flux2-klein-4b": 0.25, "qwen-image": 0.1}

    def seconds(task: dict[str, Any]) -> float:
        profile = profiles[task["model"]]
        mp = task["width"] * task["height"] / 2**20
        a, b, c = profile["step"]
        return task["count"] * (sum(profile["fixed"]) + task["steps"] * (a + b * mp + c * mp * mp))

    tasks = []
    for i in range(n):
        model = rnd.choices(list(weights), list(weights.values()))[0]
        side = rnd.choice((512, 768, 1024, 1024, 1024, 1280, 1536))
        served = "schnell" if model == "flux1" else model
        tasks.append({"prompt": f"h100 {i}", "model": served, "width": side, "height": rnd.choice((side, 1024)),
                      "steps": rnd.randint(*models[model]), "count": rnd.choice((1, 1, 1, 2, 4)),
                      "priority": rnd.random() < 0.2, "seed": i, "format": "JPEG"})
    profiles["schnell"] = profiles.pop("flux1")
    mean = statistics.fmean(seconds(t) for t in tasks)
    at, actions = 0.0, []
    quiet, burst = n // 2, range(n // 2, n // 2 + 20)
    for i, task in enumerate(tasks):
        if i == quiet:
            at += 60.0  # a quiet minute: the queue drains, the arrival history thins out
        at += 0.1 if i in burst else rnd.expovariate(load / mean)
        actions.append((at, {"submit": task}))
        if rnd.random() < 0.05:
            actions.append((at + rnd.uniform(0.5, 10.0), {"cancel": "waiting"}))
        if rnd.random() < 0.03:
            actions.append((at + rnd.uniform(0.5, 10.0), {"cancel": "running"}))
    actions.sort(key=lambda action: action[0])
    args = ["--models", ",".join(profiles), "--max-affinity-wait", str(120.0 / speed)]  # the default bound
    return Trace("h100", actions, speed, args, f"{n} tasks on an H100's measured costs (FLUX.1, Z-Image, FLUX.2 "
                                               f"klein, Qwen-Image on one worker; cold first images, count 1-4, 20% "
                                               f"priority, cancellations, a quiet minute and a burst of 20), load "
                                               f"{load:g}, ÷{speed:g}", profiles)


def write_profiles(trace: Trace, folder: Path) -> list[str]:
    """The worker arguments that give it the trace's profiles (none when it has none)."""
    if not trace.profiles:
        return []
    path = folder / f"{trace.name}-profiles.json"
    path.write_text(json.dumps(trace.profiles, indent=1))
    return ["--synthetic-profiles", str(path)]
