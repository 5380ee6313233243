"""The Python client and the mflux-client command, against a real server and synthetic worker."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest
from PIL import Image

from mflux_server.client import AsyncClient, Client, ServerError, TaskCanceled
from mflux_server.testing import ROOT, wait_for


def test_generate_waits_reports_progress_and_returns_the_images(processes):
    url = processes.server()
    processes.worker(speed=5)
    seen: list[dict] = []
    images = Client(url).generate("a red fox", count=2, steps=3, width=256, height=192, seed=7, progress=seen.append)
    assert [image.size for image in images] == [(256, 192), (256, 192)]
    assert all(isinstance(image, Image.Image) for image in images)
    steps = [(e["image"], e["step"]) for e in seen if e["event"] == "progress" and "step" in e]
    # The publisher writes only the newest step (the last one may go unwritten as the task ends): both images show.
    assert steps == sorted(steps) and {image for image, step in steps if step >= 1} == {1, 2}, steps
    assert seen[0]["event"] == "submitted" and seen[-1]["event"] == "done"


def test_errors_are_typed_from_the_servers_json(processes):
    url = processes.server()
    client = Client(url)
    with pytest.raises(ServerError) as raised:
        client.submit("x", width=1000)
    assert raised.value.status == 422 and raised.value.code == "invalid_input" and raised.value.field == "width"
    with pytest.raises(ServerError) as missing:
        client.status("nope")
    assert missing.value.status == 404 and missing.value.code == "task_not_found"


def test_a_task_canceled_while_waited_for_raises_task_canceled(processes):
    url = processes.server()  # no worker: the task stays waiting until canceled
    client = Client(url)
    task = client.submit("never runs")
    threading.Timer(0.5, lambda: client.cancel(task["task_id"])).start()
    with pytest.raises(TaskCanceled):
        client.wait(task["task_id"])


def test_the_async_client_generates(processes):
    url = processes.server()
    processes.worker(speed=5)
    blobs = asyncio.run(AsyncClient(url).generate("async", steps=2, width=128, height=128, as_pil=False))
    assert len(blobs) == 1 and blobs[0][:3] == b"\xff\xd8\xff"  # JPEG by default


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mflux_server.client.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT))


def test_the_cli_generates_files_and_shows_status_list_and_cancel(processes, tmp_path):
    url = processes.server()
    processes.worker(speed=5)
    out = tmp_path / "out"
    result = run_cli("--server", url, "generate", "a cat", "-n", "2", "-o", str(out), "--size", "256x128",
                     "--steps", "2", "--seed", "40")
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert len(paths) == 2 and all(p.endswith(".png") for p in paths)
    assert [Image.open(p).size for p in paths] == [(256, 128), (256, 128)]
    assert "queued" in result.stderr  # the progress line, plain when stderr is not a terminal
    again = run_cli("--server", url, "generate", "a cat", "-o", str(out), "--size", "256x128", "--steps", "2",
                    "--seed", "40")
    assert again.stdout.strip() not in paths, "a new file, never an overwrite"
    queued = Client(url).submit("to cancel", steps=100, width=1536, height=1536, count=8)
    status = run_cli("--server", url, "status", queued["task_id"])
    assert status.returncode == 0 and json.loads(status.stdout)["task_id"] == queued["task_id"]
    low, high = json.loads(status.stdout)["wait_range"]
    assert low <= json.loads(status.stdout)["wait_remaining"] <= high
    assert queued["task_id"] in run_cli("--server", url, "list").stdout
    assert run_cli("--server", url, "cancel", queued["task_id"]).returncode == 0
    wait_for(lambda: Client(url).status(queued["task_id"])["status"] == "canceled", what="canceled")
    bad = run_cli("--server", url, "generate", "x", "--size", "1000x1000")
    assert bad.returncode == 1 and "422 invalid_input" in bad.stderr and "multiple of 16" in bad.stderr
    down = run_cli("--server", "http://127.0.0.1:9", "list")
    assert down.returncode == 1 and "cannot reach" in down.stderr


def test_the_cli_takes_server_after_the_command_lists_with_a_header_and_says_what_cancel_did(processes, tmp_path):
    url = processes.server()
    empty = run_cli("list", "--server", url)
    assert empty.returncode == 0 and empty.stdout.strip() == "no tasks", empty.stdout + empty.stderr
    out = tmp_path / "out"
    processes.worker(speed=5)
    # The README's own command: --server after the command (it exited 2 with "unrecognized arguments").
    made = run_cli("generate", "a cat", "-n", "2", "-o", str(out), "--size", "256x128", "--steps", "2", "--server", url)
    assert made.returncode == 0, made.stderr
    assert len(made.stdout.split()) == 2
    queued = Client(url).submit("two\nlines", steps=100, width=1536, height=1536, count=8)
    rows = run_cli("list", "--server", url).stdout.splitlines()
    assert rows[0].split() == ["TASK", "STATUS", "MODEL", "PROMPT"]
    assert any(queued["task_id"] in row and "two lines" in row for row in rows), rows  # one row, not two
    first = run_cli("cancel", queued["task_id"], "--server", url)
    assert first.stdout.startswith(f"canceled {queued['task_id']}"), first.stdout
    wait_for(lambda: Client(url).status(queued["task_id"])["status"] == "canceled", what="canceled")
    second = run_cli("cancel", queued["task_id"], "--server", url)
    assert "was already canceled; removed it" in second.stdout, second.stdout  # it said "deleted"


def test_on_a_terminal_previews_never_replace_the_progress_line(processes, tmp_path):
    import os
    import pty

    url = processes.server()
    processes.worker(speed=1)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "mflux_server.client.cli", "--server", url, "generate", "a fox", "-o",
                             str(tmp_path), "--size", "512x512", "--steps", "6"], stdout=subprocess.PIPE,
                            stderr=follower, cwd=str(ROOT))
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the follower side closed: the command ended
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(timeout=60) == 0
    text = shown.decode(errors="replace")
    lines = [part.removeprefix("\x1b[K") for part in text.replace("\r\n", "\r").split("\r") if part.strip()]
    assert any("step" in line for line in lines), text
    assert "preview" not in text, text


def test_generate_with_upscale_returns_and_writes_the_upscaled_images(processes, tmp_path):
    url = processes.server()
    processes.worker("--models", "schnell,dev-controlnet-upscaler", speed=5)
    images = Client(url).generate("a pier", width=256, height=192, steps=2, count=2, upscale={"factor": 2, "steps": 2})
    assert [image.size for image in images] == [(512, 384), (512, 384)]
    result = run_cli("--server", url, "generate", "a pier", "-o", str(tmp_path), "--size", "256x128", "--steps", "2",
                     "--upscale", "1.5")
    assert result.returncode == 0, result.stderr
    [path] = result.stdout.split()
    assert Image.open(path).size == (384, 192), "the upscaled image, not the generated one"
    bad = run_cli("--server", url, "generate", "x", "--size", "256x256", "--upscale", "2", "--upscaler", "schnell")
    assert bad.returncode == 1 and "is not an upscaler" in bad.stderr, bad.stderr
