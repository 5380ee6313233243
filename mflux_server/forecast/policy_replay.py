"""Replays a multi-model worker's claim policy over the waiting queue, to forecast when a task starts. Pure."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass

from mflux_server.core.rows import ClaimKey, WaitingHead
from mflux_server.core.scheduling import choose_model, expected_load, switch_lead


@dataclass(frozen=True)
class ModelQueue:
    """One model's waiting tasks in claim order: keys, submit times, and prefix sums of predicted engine seconds."""

    keys: list[ClaimKey]
    created: list[float]
    prefix: list[float]  # prefix[i]: seconds of the first i tasks; one longer than keys
    first: int = 0  # tasks before this one have left the queue (claimed since the snapshot the lists come from)


@dataclass(frozen=True)
class Worker:
    """What the replay needs of the worker: what it holds, when it is free, its bound and its load times."""

    loaded: str | None
    free_at: float  # when its running task (or load) ends
    affinity_wait: float
    loads: Mapping[str, float]  # measured mean load seconds per model
    default_load: float  # for a model never loaded on this machine, when none was


def start_time(queues: Mapping[str, ModelQueue], model: str, key: ClaimKey, worker: Worker) -> float:
    """When the worker would claim the task `key` of `model`, if no other task arrived."""
    return timeline(queues, worker).start_in(queues, model, key)


@dataclass(frozen=True)
class Timeline:
    """The whole replay at once: each model's stretches as (first index, end index, when the first starts), and
    when the worker runs dry. Every waiting task's start is then a lookup (start_in), not a replay per request."""

    stretches: Mapping[str, list[tuple[int, int, float]]]
    done_at: float

    def start_in(self, queues: Mapping[str, ModelQueue], model: str, key: ClaimKey) -> float:
        """When the task `key` of `model` would be claimed (as start_time says)."""
        queue = queues[model]
        target = bisect.bisect_left(queue.keys, key, queue.first)
        for start, end, at in self.stretches.get(model, ()):
            if start <= target < end:
                return at + queue.prefix[target] - queue.prefix[start]
        return self.done_at


def timeline(queues: Mapping[str, ModelQueue], worker: Worker) -> Timeline:
    """Replay the claim policy over every queue to its end, recording each stretch of one model.

    The worker claims per choose_model after every task; between two decisions that can differ, the replay
    runs whole stretches of one model's queue at once (prefix sums and bisection), so it costs a few steps
    per model switch, not one per task.
    """
    pointers = {name: queue.first for name, queue in queues.items() if len(queue.keys) > queue.first}
    servable = list(queues)
    loaded, now = worker.loaded, worker.free_at
    stretches: dict[str, list[tuple[int, int, float]]] = {}
    for _ in range(sum(len(queue.keys) - queue.first for queue in queues.values()) + 1):
        heads = [WaitingHead(name, -queues[name].keys[i].neg_priority, queues[name].keys[i].seq, queues[name].created[i],
                             len(queues[name].keys) - i, len(queues[name].keys) - i)
                 for name, i in pointers.items() if i < len(queues[name].keys)]
        choice = choose_model(heads, loaded, servable, now, worker.affinity_wait, worker.loads)
        if choice is None:
            break
        if choice != loaded:
            now += expected_load(choice, worker.loads, worker.default_load)
            loaded = choice
        start = pointers[choice]
        queue = queues[choice]
        head_priority = queue.keys[start].neg_priority
        end = bisect.bisect_right(queue.keys, ClaimKey(head_priority, math.inf, math.inf, math.inf))  # type: ignore[arg-type]
        deadlines = [head.created_at + worker.affinity_wait - switch_lead(head.model, loaded, worker.loads)
                     for head in heads if head.model != choice and -head.priority == head_priority]
        claimed = end - start
        if deadlines:
            due = min(deadlines) - now + queue.prefix[start]
            claimed = min(claimed, max(bisect.bisect_right(queue.prefix, due, start, end) - start, 1))
        stretches.setdefault(choice, []).append((start, start + claimed, now))
        now += queue.prefix[start + claimed] - queue.prefix[start]
        pointers[choice] = start + claimed
    return Timeline(stretches, now)
