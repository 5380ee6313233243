"""Batched per-key request counts: exact for small limits, within a batch per process for large ones."""

from __future__ import annotations

from mflux_server.api.rate_counts import FLUSH_EVERY, RateCounts


def shared(db):
    writes: list[int] = []

    def add(key_id: int, minute: int, n: int) -> int:
        writes.append(n)
        return db.count_requests(key_id, minute, n)

    return add, writes


def test_small_limits_are_exact_across_two_processes(db):
    add, _ = shared(db)
    clock = [6000.0]
    first, second = RateCounts(add, lambda: clock[0]), RateCounts(add, lambda: clock[0])
    answers = [(first if i % 2 else second).count(7, limit=20)[0] for i in range(30)]
    assert answers.count(True) == 20 and answers[:20] == [True] * 20
    clock[0] += 60  # a new minute
    assert first.count(7, limit=20) == (True, 60.0)


def test_large_limits_write_in_batches_and_hold_within_a_batch(db):
    add, writes = shared(db)
    clock = [6000.0]
    first, second = RateCounts(add, lambda: clock[0]), RateCounts(add, lambda: clock[0])
    allowed = sum((first if i % 2 else second).count(1, limit=1000)[0] for i in range(1200))
    assert len(writes) <= 1200 // 10 + 2, "one write per batch of 10, not per request"
    assert 1000 <= allowed <= 1000 + 2 * 10, allowed
    clock[0] += FLUSH_EVERY  # a quiet key's pending count is written after FLUSH_EVERY
    first.count(2, limit=1000)
    clock[0] += FLUSH_EVERY
    before = len(writes)
    first.count(2, limit=1000)
    assert len(writes) == before + 1
