"""mflux-healthcheck, the container's HEALTHCHECK: which process PID 1 runs, and whether it is healthy."""

from __future__ import annotations

import socket

from mflux_server.healthcheck import check_api, check_worker, main, role_of_pid1
from mflux_server.testing import free_port


def test_the_role_is_read_from_pid_1s_command_line(tmp_path):
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"/opt/mflux-server/.venv/bin/python3\0/opt/mflux-server/.venv/bin/mflux-worker\0")
    assert role_of_pid1(cmdline) == "worker"
    cmdline.write_bytes(b"python3\0-m\0mflux_server.worker\0--engine\0synthetic\0")
    assert role_of_pid1(cmdline) == "worker"
    cmdline.write_bytes(b"/opt/mflux-server/.venv/bin/python3\0/opt/mflux-server/.venv/bin/mflux-server\0")
    assert role_of_pid1(cmdline) == "api"
    assert role_of_pid1(tmp_path / "missing") == "api"


def test_a_worker_is_healthy_only_while_one_on_this_host_heartbeats(db, db_path):
    host = socket.gethostname()
    assert "no worker on" in (check_worker(db_path, 5.0, host) or "")
    db.register_worker("synthetic", "schnell", None)
    assert check_worker(db_path, 5.0, host) is None
    assert "no worker on elsewhere" in (check_worker(db_path, 5.0, "elsewhere") or "")
    assert main(["worker", "--db", db_path]) == 0


def test_an_api_that_does_not_answer_is_unhealthy_and_says_why(capsys, db_path):
    port = free_port()
    assert "does not answer on port" in (check_api(port, timeout=1) or "")
    assert main(["api", "--port", str(port), "--db", db_path]) == 1
    assert "unhealthy (api)" in capsys.readouterr().err
