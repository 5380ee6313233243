"""The container image (issue 34): built here with podman from the Containerfile, then an API container and a
worker container on one queue serve a task to the host, and a restart of the worker container loses nothing.

Podman runs here only with runc, no default ulimits and the host's network; no registry can be reached, so the
Debian base image is made with debootstrap and imported under the name the Containerfile uses."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from mflux_server import store
from mflux_server.core.rows import Status
from mflux_server.testing import ROOT, free_port, wait_for

BASE = "docker.io/library/debian:bookworm-slim"
IMAGE = "localhost/mflux-server:cpu-test"
TOOLS = ("podman", "runc", "debootstrap")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]

pytestmark = pytest.mark.skipif(bool(MISSING) and not os.environ.get("CI"),
                                reason=f"LOUD SKIP: {', '.join(MISSING)} missing (make test installs them where it can)")


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One podman command with the options this machine needs (runc, no default ulimits)."""
    command = ["podman", "--runtime", "runc", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=os.environ | PODMAN_ENV)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


PODMAN_ENV: dict[str, str] = {}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image, built from the Containerfile on a Debian base made here."""
    assert not MISSING, f"CI must build the container image, but {', '.join(MISSING)} are missing"
    folder = tmp_path_factory.mktemp("container")
    conf = folder / "containers.conf"
    # runc for podman-compose too, which calls podman without our flags.
    conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
    PODMAN_ENV["CONTAINERS_CONF"] = str(conf)
    if podman("image", "exists", BASE, check=False).returncode != 0:
        rootfs = folder / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
                       check=True, capture_output=True, timeout=600)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["podman", "import", "-", BASE], stdin=tar.stdout, capture_output=True, text=True,
                                  timeout=300, env=os.environ | PODMAN_ENV)
        tar.wait()
        assert imported.returncode == 0, imported.stderr
    build = ["build", "--format", "docker", "--network", "host", "--build-arg", "FLAVOUR=cpu", "-t", IMAGE,
             "-f", str(ROOT / "Containerfile")]
    cert = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    if cert and Path(cert).is_file():  # this machine reaches PyPI through its own CA: lend it to the build only
        build += ["--volume", f"{cert}:/run/pip-ca.pem:ro", "--build-arg", "PIP_CERT=/run/pip-ca.pem"]
    podman(*build, str(ROOT), timeout=1200)
    yield IMAGE
    podman("rmi", "-f", IMAGE, check=False)


@pytest.fixture
def queue_volume(image: str) -> Iterator[str]:
    name = f"mflux-test-queue-{os.getpid()}-{time.monotonic_ns()}"
    podman("volume", "create", name)
    yield name
    podman("volume", "rm", "-f", name, check=False)


def wait_ready(url: str, what: str) -> None:
    """Wait until the API at url says it is ready (the queue takes writes and a worker heartbeats)."""

    def ready() -> bool:
        try:
            return requests.get(url + "/readyz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_for(ready, timeout=180, what=f"{what} to be ready")


def run_container(image: str, name: str, volume: str, *command: str, env: dict[str, str]) -> str:
    """Start a container on the host's network with the queue volume; returns its name (removed at the end)."""
    flags = [f"--env={key}={value}" for key, value in env.items()]
    podman("run", "-d", "--name", name, "--hostname", name, "--network", "host", "--volume",
           f"{volume}:/var/lib/mflux-server", *flags, image, *command)
    return name


@pytest.mark.parametrize("queue", ["sqlite", "postgresql"])
def test_the_image_runs_the_api_and_a_worker_on_one_queue_and_a_worker_restart_loses_nothing(image, queue_volume, queue,
                                                                                              request):
    port = free_port()
    env = {"MFLUX_SERVER_PORT": str(port), "MFLUX_SERVER_STALE_AFTER": "5", "MFLUX_SERVER_HEARTBEAT_INTERVAL": "1"}
    if queue == "postgresql":  # the host's throwaway server, on loopback: the containers share the host's network
        env["MFLUX_SERVER_DB"] = request.getfixturevalue("postgres_server").create_database()
    suffix = f"{os.getpid()}-{time.monotonic_ns() % 10**6}"
    api, worker = f"mflux-api-{suffix}", f"mflux-worker-{suffix}"
    try:
        run_container(image, api, queue_volume, env=env)
        # Steps of 0.25 s, so a task is still running when the worker container restarts.
        run_container(image, worker, queue_volume, "mflux-worker", env=env | {
            "MFLUX_SERVER_ENGINE": "synthetic", "MFLUX_SERVER_SYNTHETIC_STEP": "0.25,0,0"})
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, f"the API container {api}")
        assert podman("exec", api, "id", "-u").stdout.strip() == "10001", "the processes do not run as root"
        for name in (api, worker):
            health = podman("healthcheck", "run", name, check=False)
            logs = podman("logs", name, check=False)
            assert health.returncode == 0, f"{name} unhealthy: {health.stdout}{health.stderr}\n{logs.stderr[-3000:]}"

        first = requests.post(url + "/api/generate", json={"prompt": "from the host", "width": 256, "height": 256,
                                                           "steps": 2}, timeout=10).json()
        wait_for(lambda: requests.get(url + "/api/status", params={"task_id": first["task_id"]}, timeout=5).json()["status"]
                 == "done", timeout=60, what="the first task")
        image_bytes = requests.get(url + "/api/image", params={"task_id": first["task_id"], "delete": "false"}, timeout=10)
        assert image_bytes.status_code == 200
        assert Image.open(io.BytesIO(image_bytes.content)).size == (256, 256)

        running = requests.post(url + "/api/generate", json={"prompt": "runs through a restart", "width": 256,
                                                             "height": 256, "steps": 40}, timeout=10).json()
        waiting = [requests.post(url + "/api/generate", json={"prompt": f"waits {n}", "width": 256, "height": 256,
                                                              "steps": 2}, timeout=10).json() for n in range(3)]
        wait_for(lambda: requests.get(url + "/api/status", params={"task_id": running["task_id"]}, timeout=5).json()
                 ["status"] == "processing", timeout=60, what="the long task to start")
        podman("restart", "--time", "60", worker, timeout=180)  # SIGTERM: the task goes back at a step boundary
        for task in (running, *waiting):
            wait_for(lambda task=task: requests.get(url + "/api/status", params={"task_id": task["task_id"]},
                                                    timeout=5).json()["status"] == "done", timeout=120,
                     what=f"{task['task_id']} after the restart")
        listed = requests.get(url + "/api/tasks", params={"status": "done", "limit": 100}, timeout=10).json()
        assert {t["task_id"] for t in listed["tasks"]} >= {t["task_id"] for t in (first, running, *waiting)}
        # The queue is where the containers were told it is: the PostgreSQL database, or the file on the volume.
        where = env.get("MFLUX_SERVER_DB") or str(Path(podman("volume", "inspect", queue_volume, "--format",
                                                               "{{.Mountpoint}}").stdout.strip()) / "queue.db")
        held = store.connect(where)
        try:
            assert all(held.get(t["task_id"]).status is Status.DONE for t in (first, running, *waiting))
        finally:
            held.close()
        logs = podman("logs", worker)
        assert "the task goes back to the queue" in logs.stdout + logs.stderr, "the SIGTERM did not put it back"
    finally:
        for name in (worker, api):
            podman("rm", "-f", "-t", "5", name, check=False)


def test_compose_runs_the_sqlite_profile_and_serves_a_task_to_the_host(image, tmp_path):
    """The compose file itself, with podman-compose: its sqlite profile (no registry here for PostgreSQL's image),
    on the image built above under the name the file uses."""
    compose = str(Path(sys.executable).parent / "podman-compose")  # beside this interpreter, in .venv
    assert Path(compose).exists(), "podman-compose is a test dependency (setup.cfg)"
    named = podman("image", "exists", "localhost/mflux-server:cpu", check=False).returncode == 0
    if not named:  # an image of that name built here before is left as it is (and used)
        podman("tag", image, "localhost/mflux-server:cpu")
    project, port = f"mflux-test-{os.getpid()}", free_port()
    env = os.environ | PODMAN_ENV | {"MFLUX_PORT": str(port)}

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([compose, "-p", project, "-f", str(ROOT / "compose.yaml"), "--profile", "sqlite", *args],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=str(tmp_path))
        assert done.returncode == 0, f"podman-compose {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    try:
        run("up", "-d", "--no-build")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, "the compose API")
        task = requests.post(url + "/api/generate", json={"prompt": "through compose", "width": 256, "height": 256,
                                                          "steps": 2}, timeout=10).json()
        wait_for(lambda: requests.get(url + "/api/status", params={"task_id": task["task_id"]}, timeout=5).json()
                 ["status"] == "done", timeout=120, what="the task through compose")
        fetched = requests.get(url + "/api/image", params={"task_id": task["task_id"]}, timeout=10)
        assert Image.open(io.BytesIO(fetched.content)).size == (256, 256)
    finally:
        subprocess.run([compose, "-p", project, "-f", str(ROOT / "compose.yaml"), "--profile", "sqlite", "down", "-v",
                        "-t", "10"], capture_output=True, timeout=300, env=env, cwd=str(tmp_path))
        if not named:
            podman("untag", image, "localhost/mflux-server:cpu", check=False)


def test_the_compose_file_has_both_profiles_the_gpu_reservation_and_the_volumes():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    profiles = {name: service.get("profiles", []) for name, service in services.items()}
    assert {n for n, p in profiles.items() if "postgres" in p} == {"postgres", "api", "worker"}
    assert {n for n, p in profiles.items() if "sqlite" in p} == {"api-sqlite", "worker-sqlite"}
    for api, worker in (("api", "worker"), ("api-sqlite", "worker-sqlite")):
        assert services[api]["command"] == ["mflux-server"] and services[worker]["command"] == ["mflux-worker"]
        assert services[api]["image"] == services[worker]["image"], "one image runs both"
        assert "127.0.0.1:${MFLUX_PORT:-4030}:4030" in services[api]["ports"]
        assert any(v.endswith(":/var/cache/huggingface") for v in services[worker]["volumes"])
    shared = [v for v in services["api-sqlite"]["volumes"] if v.endswith(":/var/lib/mflux-server")]
    assert shared and shared[0] in services["worker-sqlite"]["volumes"], "the SQLite queue is one shared volume"
    url = services["api"]["environment"]["MFLUX_SERVER_DB"]
    assert url.startswith("postgresql://") and url == services["worker"]["environment"]["MFLUX_SERVER_DB"]
    assert services["api"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    cuda = yaml.safe_load((ROOT / "compose.cuda.yaml").read_text())["services"]
    for worker in ("worker", "worker-sqlite"):
        [device] = cuda[worker]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert cuda[worker]["build"]["args"]["FLAVOUR"] == "cuda"
        assert cuda[worker]["environment"]["MFLUX_SERVER_ENGINE"] == "mflux"
    assert cuda["api"]["image"] == cuda["worker"]["image"] == "localhost/mflux-server:cuda"
