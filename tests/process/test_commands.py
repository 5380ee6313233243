"""The two commands as subprocesses: each offers only its own flags."""

from __future__ import annotations

import subprocess
import sys


def test_api_does_not_offer_worker_flags_and_vice_versa():
    api_help = subprocess.run([sys.executable, "-m", "mflux_server", "--help"], capture_output=True, text=True).stdout
    worker_help = subprocess.run([sys.executable, "-m", "mflux_server.worker", "--help"], capture_output=True, text=True).stdout
    assert "--port" in api_help and "--quantize" not in api_help and "MFLUX_SERVER_PORT" in api_help
    assert "--quantize" in worker_help and "--port" not in worker_help and "--db" in worker_help
