"""A server process told to stop while it boots exits quietly; one that fails to boot on its own still halts."""

from __future__ import annotations

import pytest
from gunicorn.workers.ggevent import GeventWorker

from mflux_server.api.deadlines import DeadlineGeventWorker


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> DeadlineGeventWorker:
    """A server process whose boot (gunicorn's) fails, as when a stop signal lands in the middle of it."""
    def failing_boot(self: GeventWorker) -> None:
        raise RuntimeError("interrupted in the middle of the boot")

    monkeypatch.setattr(GeventWorker, "init_process", failing_boot)
    found = DeadlineGeventWorker.__new__(DeadlineGeventWorker)  # gunicorn's constructor wants a whole arbiter
    found.alive = True
    return found


def test_a_boot_that_fails_on_its_own_still_fails_so_that_gunicorn_halts(worker):
    with pytest.raises(RuntimeError):
        worker.init_process()


@pytest.mark.parametrize("signal_taken", ["quit", "term"])
def test_a_process_told_to_stop_while_it_boots_exits_with_status_0(worker, signal_taken):
    if signal_taken == "quit":
        worker.quitting = True  # what handle_quit (SIGINT, SIGQUIT) records at once
    else:
        worker.alive = False  # what handle_exit (SIGTERM) does
    with pytest.raises(SystemExit) as stopped:
        worker.init_process()
    assert stopped.value.code == 0
