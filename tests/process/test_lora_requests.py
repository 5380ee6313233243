"""LoRAs per request through the real API and a real synthetic worker, both given the same --lora-dir."""

from __future__ import annotations

import io
from pathlib import Path

import requests
from PIL import Image, ImageStat

from mflux_server.testing import wait_for
from mflux_server.worker.engines.synthetic import lora_colour
from tests.conftest import submit, wait_status
from tests.fast.test_loras import keys_only_in, write_lora
from tests.process.test_client import run_cli


def mean_distance(picture: bytes, colour: tuple[int, int, int]) -> float:
    means = ImageStat.Stat(Image.open(io.BytesIO(picture)).convert("RGB")).mean
    return sum(abs(mean - channel) for mean, channel in zip(means, colour, strict=True))


def test_a_request_names_a_lora_from_the_library_and_its_image_shows_it(processes, tmp_path: Path):
    folder = tmp_path / "loras"
    lora = write_lora(folder / "styles" / "ink.safetensors", keys_only_in("flux1", "qwen-image"))
    url = processes.server("--lora-dir", str(folder))
    processes.worker("--lora-dir", str(folder))
    listed = requests.get(f"{url}/api/loras", timeout=10).json()
    assert [entry["name"] for entry in listed["loras"]] == ["styles/ink"]
    common = {"prompt": "a harbour", "seed": 3, "width": 256, "height": 256, "steps": 2, "format": "PNG"}
    plain = submit(url, **common)
    inked = submit(url, **common, loras=[{"name": "styles/ink", "scale": 3.0}])
    for task_id in (plain, inked):
        wait_status(url, task_id, ("done",))
    images = {task_id: requests.get(f"{url}/api/image", params={"task_id": task_id, "delete": "false"},
                                    timeout=10).content for task_id in (plain, inked)}
    colour = lora_colour(str(lora))
    assert mean_distance(images[inked], colour) < mean_distance(images[plain], colour) - 20, "the LoRA tinted it"
    assert requests.get(f"{url}/api/tasks/{inked}", timeout=10).json()["loras"] == [{"name": "styles/ink",
                                                                                     "scale": 3.0}]
    # The command line names it as NAME:SCALE; the Python client passes loras= through (the same request).
    out = tmp_path / "out"
    made = run_cli("--server", url, "generate", "a harbour", "--seed", "3", "--size", "256x256", "--steps", "2",
                   "-o", str(out), "--lora", "styles/ink:3")
    assert made.returncode == 0, made.stderr
    assert mean_distance(Path(made.stdout.split()[0]).read_bytes(), colour) < mean_distance(images[plain], colour) - 20
    refused = run_cli("--server", url, "generate", "x", "--lora", "nothing")
    assert refused.returncode == 1 and "no LoRA named 'nothing'" in refused.stderr


def test_a_worker_without_the_file_fails_the_task_saying_so(processes, tmp_path: Path):
    folder = tmp_path / "loras"
    write_lora(folder / "ink.safetensors", keys_only_in("flux1", "qwen-image"))
    url = processes.server("--lora-dir", str(folder))
    processes.worker("--lora-dir", str(tmp_path / "elsewhere"))
    task_id = submit(url, prompt="x", width=256, height=256, steps=1, loras=[{"name": "ink"}])
    failed = wait_status(url, task_id, ("error",))
    assert "not in this worker's LoRA library" in failed["error"] and "same --lora-dir" in failed["error"]
    wait_for(lambda: requests.get(f"{url}/api/info", timeout=10).ok, what="the API still answers")


def test_a_worker_groups_work_by_lora_set_measures_the_change_and_keeps_the_bound(db, db_path, processes, tmp_path):
    from mflux_server.core.rows import lora_set_text
    from mflux_server.core.scheduling import LORA_CHANGE
    from tests.conftest import queue_task, reread, status_of

    folder = tmp_path / "loras"
    for name in ("ink", "paper"):
        write_lora(folder / f"{name}.safetensors", keys_only_in("flux1", "qwen-image"))
    sets = {name: lora_set_text(((name, 1.0),)) for name in ("ink", "paper")}
    tasks = [queue_task(db, width=256, height=256, steps=2, prompt=f"{name} {i}", loras=sets[name])
             for i in range(3) for name in ("ink", "paper")]
    processes.worker("--lora-dir", str(folder), "--synthetic-lora-change", "10", "--max-affinity-wait", "600")
    wait_for(lambda: all(status_of(db_path, t.id) == "done" for t in tasks), what="all tasks done")
    order = [t.prompt for t in sorted((reread(db_path, t.id) for t in tasks), key=lambda t: t.started_at)]
    assert order == ["ink 0", "ink 1", "ink 2", "paper 0", "paper 1", "paper 2"], "one change of set, not five"
    change = db.load_stats()["schnell" + LORA_CHANGE]
    assert change.n == 2 and change.last >= 10 / 20, "none to ink, ink to paper: each measured"
    # The held set's work goes first, but not past the bound (3 s here): an older task of another set falls
    # due its change's measured length early, and starts once the task running then ends.
    processes.stop_all()
    processes.worker("--lora-dir", str(folder), "--synthetic-lora-change", "1", "--max-affinity-wait", "3",
                     speed=1.0)
    first = queue_task(db, width=256, height=256, steps=2, prompt="s", loras=sets["ink"])
    wait_for(lambda: status_of(db_path, first.id) == "done", what="the first ink task (after its change)")
    waiting = queue_task(db, width=256, height=256, steps=2, prompt="p", loras=sets["paper"])
    stream = [queue_task(db, width=256, height=256, steps=2, prompt=f"s{i}", loras=sets["ink"]) for i in range(14)]
    wait_for(lambda: status_of(db_path, waiting.id) == "done", what="the paper task")
    started = reread(db_path, waiting.id).started_at
    before = [t for t in stream if (reread(db_path, t.id).started_at or 1e18) < started]
    assert 0 < len(before) < len(stream), "the held set's work first, but not all of it"
    assert started - waiting.created_at < 3 + 1.0, "within the bound plus the task running when it fell due"

