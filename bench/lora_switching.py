"""Benchmark 13: one model under three LoRA sets, grouped by set, against one set and first-in first-out."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.forecast_accuracy import mape
from bench.model_switching import (
    AFFINITY,
    IMAGE_SECONDS,
    LOAD,
    Run,
    add_longest_wait,
    add_throughput,
    make_trace,
    replay,
)
from bench.results import Result, percentile
from mflux_server.core.lora_library import patterns

# In model seconds, as benchmark 6. mflux bakes a LoRA set into the weights, so a change of set is a reload
# without the warm-up (kernel compilation): assumed 5 s here, a third of benchmark 6's 15 s load with its
# warm-up. The H100 figures in ../shared/data hold no checkpoint reads, so this is not a measurement of mflux;
# bench/explanations.md says what happened at 10 s.
CHANGE_SECONDS = 5.0
SETS = {"ink": 1 / 3, "paper": 1 / 3, "neon": 1 / 3}


def library(folder: Path) -> Path:
    """Three LoRA files of FLUX.1's family: real safetensors headers naming tensors as mflux maps them."""
    import json
    import struct

    keys = sorted(patterns()["flux1"])[:16]
    for name in SETS:
        header: dict[str, Any] = {key.replace("{block}", "0"): {"dtype": "F32", "shape": [1, 1],
                                                               "data_offsets": [4 * i, 4 * i + 4]}
                                  for i, key in enumerate(keys)}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (folder / f"{name}.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * (4 * len(keys)))
    return folder


def with_sets(folder: Path, one: bool) -> tuple[list[str], Callable[[str], dict[str, Any]]]:
    """A worker's arguments for the library, and a trace entry's fields (one: every task asks for ink)."""
    return (["--lora-dir", str(folder), "--synthetic-lora-change", str(CHANGE_SECONDS)],
            lambda name: {"loras": [{"name": "ink" if one else name, "scale": 1.0}]})


def run(smoke: bool = False) -> Result:
    """The same trace three times: one LoRA set, three grouped by set (ours), three first-in first-out."""
    n, speed = (24, 200.0) if smoke else (360, 20.0)
    trace = make_trace(n, random.Random(7), SETS)
    result = Result("LoRA switching", f"make bench ARGS='--only loras'  ({n} tasks of 1024², 4 steps, one model, "
                                      f"three LoRA sets in equal shares, Poisson arrivals at load {LOAD:g}, a change "
                                      f"of set {CHANGE_SECONDS:g} s, ~{IMAGE_SECONDS:g} s an image, synthetic engine "
                                      f"time-scaled ÷{speed:g})")
    with tempfile.TemporaryDirectory(prefix="bench-loras-") as folder:
        found = library(Path(folder))
        server = ["--lora-dir", str(found)]
        one = replay("one set", trace, speed, AFFINITY, *with_sets(found, one=True), server_args=server)
        ours = replay("ours", trace, speed, AFFINITY, *with_sets(found, one=False), server_args=server)
        fifo = replay("fifo", trace, speed, 0.0, *with_sets(found, one=False), server_args=server)
    add_throughput(result, one, ours, fifo, "one LoRA set", "three sets", "changes of set")
    for policy in (ours, fifo):
        p99 = round(percentile([w for waits in policy.waits.values() for w in waits], 99), 1)
        result.add(f"p99 wait (submit to start), {policy.label}", p99, " s")
    add_longest_wait(result, ours)
    result.add("forecast MAPE of expected_time_seconds, ours", mape(ours.forecasts[10:]), "%")
    result.add("  same, one set", mape(one.forecasts[10:]), "%")
    result.notes.append(f"Waits are from submit to start, in model seconds. Ours: --max-affinity-wait {AFFINITY:g}; "
                        "first-in first-out: --max-affinity-wait 0. The forecast replays the worker's grouping by "
                        "set (docs/forecast.md) but not the arrivals that extend a set's turn: its error is reported, "
                        "with no target yet.")
    result.extra = {"runs": (one, ours, fifo)}
    return result


__all__ = ["Run", "run"]
