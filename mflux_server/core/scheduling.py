"""The claim policy of a worker serving several models, shared by the worker and the forecast that replays it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from mflux_server.core.rows import WaitingHead


def choose_model(heads: list[WaitingHead], loaded: str | None, servable: Sequence[str], now: float,
                 max_affinity_wait: float, load_seconds: Mapping[str, float] | None = None) -> str | None:
    """Which model's next task to claim: keep the loaded model while work waits for it, never starving another.

    Only the highest waiting priority counts. A task that has waited longer than max_affinity_wait is served
    first (oldest first), switching models if need be; otherwise the loaded model's work, otherwise the model
    with the most waiting images. A switch starts its model's expected load (`load_seconds`) early, so the
    task starts within max_affinity_wait plus the task running when it fell due.
    """
    candidates = [head for head in heads if head.model in servable]
    if not candidates:
        return None
    top = max(head.priority for head in candidates)
    candidates = [head for head in candidates if head.priority == top]
    overdue = [head for head in candidates
               if now - head.created_at > max_affinity_wait - switch_lead(head.model, loaded, load_seconds or {})]
    if overdue:
        return min(overdue, key=lambda head: head.seq).model
    if any(head.model == loaded for head in candidates):
        return loaded
    return max(candidates, key=lambda head: (head.images, -head.seq)).model


def expected_load(model: str, load_seconds: Mapping[str, float], default: float) -> float:
    """A model's expected load time: its measured mean, else the mean of the models measured here, else default."""
    if model in load_seconds:
        return load_seconds[model]
    return sum(load_seconds.values()) / len(load_seconds) if load_seconds else default


def switch_lead(model: str, loaded: str | None, load_seconds: Mapping[str, float]) -> float:
    """Seconds before its affinity bound a task of another model falls due: that model's expected load time."""
    return 0.0 if model == loaded else expected_load(model, load_seconds, 0.0)
