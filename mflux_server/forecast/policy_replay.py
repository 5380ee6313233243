"""Replays a multi-model worker's claim policy over the waiting queue, to forecast when a task starts. Pure."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass

from mflux_server.core.rows import ClaimKey, WaitingHead
from mflux_server.core.scheduling import Variant, choose_variant, expected_load, expected_lora_change, switch_lead


@dataclass(frozen=True)
class ModelQueue:
    """One variant's (a model and LoRA set's) waiting tasks in claim order: keys, submit times, and prefix sums of
    predicted engine seconds."""

    keys: list[ClaimKey]
    created: list[float]
    prefix: list[float]  # prefix[i]: seconds of the first i tasks; one longer than keys
    first: int = 0  # tasks before this one have left the queue (claimed since the snapshot the lists come from)


@dataclass(frozen=True)
class Worker:
    """What the replay needs of the worker: what it holds, when it is free, its bound and its load times."""

    loaded: Variant | None
    free_at: float  # when its running task (or load) ends
    affinity_wait: float
    loads: Mapping[str, float]  # measured mean load seconds per model (and LoRA-set change, LORA_CHANGE)
    default_load: float  # for a model never loaded on this machine, when none was

    def change_seconds(self, to: Variant, held: Variant | None) -> float:
        """What the worker spends to go from the held variant to another: a load (which leaves the default LoRA
        set), then the change to the variant's set unless that is the default."""
        if held is not None and held.model == to.model:
            return 0.0 if held.loras == to.loras else expected_lora_change(to.model, self.loads, self.default_load)
        load = expected_load(to.model, self.loads, self.default_load)
        return load + (expected_lora_change(to.model, self.loads, self.default_load) if to.loras else 0.0)


def start_time(queues: Mapping[Variant, ModelQueue], variant: Variant, key: ClaimKey, worker: Worker) -> float:
    """When the worker would claim the task `key` of `variant`, if no other task arrived."""
    return timeline(queues, worker).start_in(queues, variant, key)


@dataclass(frozen=True)
class Timeline:
    """The whole replay at once: each variant's stretches as (first index, end index, when the first starts), and
    when the worker runs dry. Every waiting task's start is then a lookup (start_in), not a replay per request."""

    stretches: Mapping[Variant, list[tuple[int, int, float]]]
    done_at: float

    def start_in(self, queues: Mapping[Variant, ModelQueue], variant: Variant, key: ClaimKey) -> float:
        """When the task `key` of `variant` would be claimed (as start_time says)."""
        queue = queues[variant]
        target = bisect.bisect_left(queue.keys, key, queue.first)
        for start, end, at in self.stretches.get(variant, ()):
            if start <= target < end:
                return at + queue.prefix[target] - queue.prefix[start]
        return self.done_at

    def started_before(self, queues: Mapping[Variant, ModelQueue], at: float) -> int:
        """How many waiting tasks, of every queue, the replay starts before the time `at`."""
        total = 0
        for variant, stretches in self.stretches.items():
            prefix = queues[variant].prefix
            for first, end, begun in stretches:
                if begun < at:  # task i of the stretch starts at begun + prefix[i] - prefix[first]; a microsecond
                    # off `at` is at it (the sums are rounded), so a task is not counted as starting before itself
                    total += bisect.bisect_left(prefix, at - begun + prefix[first] - 1e-6, first, end) - first
        return total


def timeline(queues: Mapping[Variant, ModelQueue], worker: Worker) -> Timeline:
    """Replay the claim policy over every queue to its end, recording each stretch of one variant.

    The worker claims per choose_variant after every task; between two decisions that can differ, the replay
    runs whole stretches of one variant's queue at once (prefix sums and bisection), so it costs a few steps
    per switch of model or LoRA set, not one per task.
    """
    pointers = {name: queue.first for name, queue in queues.items() if len(queue.keys) > queue.first}
    servable = list(dict.fromkeys(name.model for name in queues))
    loaded, now = worker.loaded, worker.free_at
    stretches: dict[Variant, list[tuple[int, int, float]]] = {}
    for _ in range(sum(len(queue.keys) - queue.first for queue in queues.values()) + 1):
        heads = [_head_of(name, queues[name], i) for name, i in pointers.items() if i < len(queues[name].keys)]
        choice = choose_variant(heads, loaded, servable, now, worker.affinity_wait, worker.loads)
        if choice is None:
            break
        if choice != loaded:
            now += worker.change_seconds(choice, loaded)
            loaded = choice
        start = pointers[choice]
        queue = queues[choice]
        head_priority = queue.keys[start].neg_priority
        end = bisect.bisect_right(queue.keys, ClaimKey(head_priority, math.inf, math.inf, math.inf))  # type: ignore[arg-type]
        deadlines = [head.created_at + worker.affinity_wait - switch_lead(Variant(head.model, head.loras), loaded,
                                                                          worker.loads)
                     for head in heads if (head.model, head.loras) != choice and -head.priority == head_priority]
        claimed = end - start
        if deadlines:
            due = min(deadlines) - now + queue.prefix[start]
            claimed = min(claimed, max(bisect.bisect_right(queue.prefix, due, start, end) - start, 1))
        stretches.setdefault(choice, []).append((start, start + claimed, now))
        now += queue.prefix[start + claimed] - queue.prefix[start]
        pointers[choice] = start + claimed
    return Timeline(stretches, now)


def _head_of(variant: Variant, queue: ModelQueue, index: int) -> WaitingHead:
    """The waiting head the worker would read for a variant's queue from `index` on (its tasks counted as images)."""
    key = queue.keys[index]
    left = len(queue.keys) - index
    return WaitingHead(variant.model, -key.neg_priority, key.seq, queue.created[index], left, left, variant.loras)
