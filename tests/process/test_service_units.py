"""The systemd units and launchd plists: valid, flag-free, and a setting in the env file reaches the process."""

from __future__ import annotations

import os
import plistlib
import shlex
import shutil
import subprocess
import sys

import pytest
import requests

from mflux_server import store
from mflux_server.testing import ROOT, free_port, wait_for

UNITS = {"api": ROOT / "systemd" / "mflux-server.service", "worker": ROOT / "systemd" / "mflux-worker.service"}
PLISTS = [ROOT / "launchd" / "org.mflux-server.api.plist", ROOT / "launchd" / "org.mflux-server.worker.plist"]


def unit_service(path) -> list[tuple[str, str]]:
    """The [Service] section's key=value lines, in order."""
    section, pairs = None, []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def unit_environment(path, env_file) -> dict[str, str]:
    """The environment systemd gives the service: Environment= lines, then EnvironmentFile= overriding them."""
    env: dict[str, str] = {}
    for key, value in unit_service(path):
        if key == "Environment":
            name, _, setting = value.partition("=")
            env[name] = setting
    for line in env_file.read_text().splitlines():  # EnvironmentFile= wins over Environment= (systemd.exec(5))
        if line.strip() and not line.startswith("#"):
            name, _, setting = line.partition("=")
            env[name.strip()] = setting.strip()
    return env


@pytest.mark.parametrize("role", ["api", "worker"])
def test_units_pass_no_flags_so_the_env_file_always_wins(role):
    service = dict(unit_service(UNITS[role]))
    assert service["EnvironmentFile"] == "-/etc/mflux-server/env"
    assert " " not in service["ExecStart"], f"ExecStart passes flags, which beat the env file: {service['ExecStart']}"
    for plist in PLISTS:
        arguments = plistlib.loads(plist.read_bytes())["ProgramArguments"]
        assert len(arguments) == 1, f"{plist.name} passes flags: {arguments}"


@pytest.mark.parametrize("store_kind", ["sqlite", "postgresql"])
def test_a_setting_in_the_env_file_reaches_both_processes(tmp_path, request, store_kind):
    # The env file is where a several-host install puts its PostgreSQL URL (and password): it must reach both.
    queue = tmp_path / "queue.db" if store_kind == "sqlite" else request.getfixturevalue("postgres_server").create_database()
    port = free_port()
    env_file = tmp_path / "env"
    env_file.write_text(f"MFLUX_SERVER_DB={queue}\nMFLUX_SERVER_PORT={port}\nMFLUX_SERVER_MODEL=dev\n"
                        "MFLUX_SERVER_ENGINE=synthetic\nMFLUX_SERVER_HTTP_WORKERS=1\n")
    procs = []
    try:
        for role in ("api", "worker"):
            program, *flags = shlex.split(dict(unit_service(UNITS[role]))["ExecStart"])
            module = {"mflux-server": "mflux_server", "mflux-worker": "mflux_server.worker"}[program.rsplit("/", 1)[1]]
            env = {**os.environ, **unit_environment(UNITS[role], env_file)}
            # The unit's command line as written (its flags too, were there any), in the unit's environment.
            procs.append(subprocess.Popen([sys.executable, "-m", module, *flags], env=env, cwd=str(ROOT),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        info = wait_for(lambda: _info(port), what="the API from the unit's environment")
        assert info["default_model"] == "dev", "MFLUX_SERVER_MODEL=dev in the env file reached the API"

        def worker_model():
            db = store.connect(str(queue))
            try:
                return [w.model for w in db.live_workers(15.0)]
            finally:
                db.close()

        assert wait_for(worker_model, what="the worker from the unit's environment") == ["dev"]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=15)


def _info(port: int):
    try:
        return requests.get(f"http://127.0.0.1:{port}/api/info", timeout=1).json()
    except requests.ConnectionError:
        return None


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="LOUD SKIP: systemd-analyze is not installed")
def test_systemd_analyze_verify_passes_with_the_install_paths_in_a_scratch_root(tmp_path):
    def verify(units: dict[str, str]) -> subprocess.CompletedProcess[str]:
        paths = []
        for name, text in units.items():
            # The unit as installed here: the checkout for /opt/mflux-server, a scratch folder for /etc/mflux-server.
            path = tmp_path / name
            path.write_text(text.replace("/opt/mflux-server", str(ROOT)).replace("/etc/mflux-server", str(tmp_path)))
            paths.append(str(path))
        return subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True, timeout=60)

    assert (ROOT / ".venv" / "bin" / "mflux-server").exists(), "make install makes the entry points the units run"
    units = {path.name: path.read_text() for path in UNITS.values()}
    checked = verify(units)
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
    broken = verify({"broken.service": units["mflux-server.service"].replace("ExecStart=/", "ExecStart=")})
    assert broken.returncode != 0, "verify catches a broken unit, so the check above means something"


def test_both_processes_tell_systemd_they_are_ready_and_ping_its_watchdog(tmp_path):
    import socket
    import tempfile

    units = {role: dict(unit_service(path)) for role, path in UNITS.items()}
    assert all(u["Type"] == "notify" and u["NotifyAccess"] == "all" and int(u["WatchdogSec"]) >= 30 for u in units.values())
    address = tempfile.mktemp(prefix="notify-", dir="/tmp")  # short: a socket path has at most 107 bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(0.5)
    queue, port = tmp_path / "queue.db", free_port()
    env = {**os.environ, "NOTIFY_SOCKET": address, "MFLUX_SERVER_DB": str(queue), "MFLUX_SERVER_PORT": str(port),
           "MFLUX_SERVER_ENGINE": "synthetic", "MFLUX_SERVER_HTTP_WORKERS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", module], env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for module in ("mflux_server", "mflux_server.worker")]
    messages: list[str] = []
    try:
        def heard() -> bool:
            try:
                messages.append(listener.recv(4096).decode())
            except TimeoutError:
                pass
            text = "\n".join(messages)
            return text.count("READY=1") >= 2 and text.count("WATCHDOG=1") >= 2
        wait_for(heard, timeout=30, what="READY=1 from both and a watchdog ping from each")
        assert any("STATUS=worker" in m for m in messages) and any("Gunicorn" in m for m in messages)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=15)
        listener.close()
        os.unlink(address)
