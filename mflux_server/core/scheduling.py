"""The claim policy of a worker serving several models, shared by the worker and the forecast that replays it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from mflux_server.core.rows import WaitingHead

# load_stats holds a LoRA-set change beside model loads, under the model's name with this suffix ('+' is in no
# model name or Hugging Face repository).
LORA_CHANGE = "+loras"


class Variant(NamedTuple):
    """What a worker holds: a model and the LoRA set on it (tasks.loras' text; "" for the default set)."""

    model: str
    loras: str = ""


def variant_of(head: WaitingHead) -> Variant:
    """The variant a waiting head's tasks run on."""
    return Variant(head.model, head.loras)


def choose_variant(heads: list[WaitingHead], loaded: Variant | None, servable: Sequence[str], now: float,
                   max_affinity_wait: float, load_seconds: Mapping[str, float] | None = None) -> Variant | None:
    """Which variant's next task to claim: keep the held one while work waits for it, never starving another.

    Only the highest waiting priority counts. A task that has waited longer than max_affinity_wait is served
    first (oldest first), switching if need be; otherwise the held variant's work, otherwise another LoRA set
    of the held model (a change of set costs at most a reload), otherwise the variant with the most waiting
    images. A switch starts its expected cost (`load_seconds`, switch_lead) early, so the task starts within
    max_affinity_wait plus the task running when it fell due.
    """
    candidates = [head for head in heads if head.model in servable]
    if not candidates:
        return None
    top = max(head.priority for head in candidates)
    candidates = [head for head in candidates if head.priority == top]
    overdue = [head for head in candidates
               if now - head.created_at > max_affinity_wait - switch_lead(variant_of(head), loaded, load_seconds or {})]
    if overdue:
        return variant_of(min(overdue, key=lambda head: head.seq))
    if loaded is not None and any(variant_of(head) == loaded for head in candidates):
        return loaded
    same_model = [head for head in candidates if loaded is not None and head.model == loaded.model]
    return variant_of(max(same_model or candidates, key=lambda head: (head.images, -head.seq)))


def choose_model(heads: list[WaitingHead], loaded: str | None, servable: Sequence[str], now: float,
                 max_affinity_wait: float, load_seconds: Mapping[str, float] | None = None) -> str | None:
    """choose_variant over models alone (every head on the default LoRA set)."""
    chosen = choose_variant(heads, None if loaded is None else Variant(loaded), servable, now, max_affinity_wait,
                            load_seconds)
    return None if chosen is None else chosen.model


def expected_load(model: str, load_seconds: Mapping[str, float], default: float) -> float:
    """A model's expected load time: its measured mean, else the mean of the models measured here, else default."""
    if model in load_seconds:
        return load_seconds[model]
    loads = [seconds for name, seconds in load_seconds.items() if not name.endswith(LORA_CHANGE)]
    return sum(loads) / len(loads) if loads else default


def expected_lora_change(model: str, load_seconds: Mapping[str, float], default: float) -> float:
    """Seconds to change a model's LoRA set: measured, else its load time (mflux bakes LoRAs in, so it reloads)."""
    return load_seconds.get(model + LORA_CHANGE, expected_load(model, load_seconds, default))


def switch_lead(variant: Variant | str, loaded: Variant | str | None, load_seconds: Mapping[str, float]) -> float:
    """Seconds before its affinity bound a task of another variant falls due: that variant's expected change cost."""
    variant = Variant(variant) if isinstance(variant, str) else variant
    loaded = Variant(loaded) if isinstance(loaded, str) else loaded
    if variant == loaded:
        return 0.0
    if loaded is not None and variant.model == loaded.model:
        return expected_lora_change(variant.model, load_seconds, 0.0)
    return expected_load(variant.model, load_seconds, 0.0)
