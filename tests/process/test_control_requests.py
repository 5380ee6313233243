"""ControlNet, depth and upscaling through the real API, CLI and a real synthetic worker."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageStat

from mflux_server.worker.engines.base import Control
from mflux_server.worker.engines.synthetic import control_map
from tests.process.test_client import run_cli


def test_the_cli_sends_a_control_image_and_the_worker_paints_its_map(processes, tmp_path: Path):
    url = processes.server()
    processes.worker("--models", "dev-depth")
    photo = Image.new("RGB", (256, 256), "white")
    photo.paste((20, 20, 20), (64, 64, 192, 192))
    photo.save(tmp_path / "depth.png")
    made = run_cli("--server", url, "generate", "a room", "--model", "dev-depth", "--steps", "2", "-o",
                   str(tmp_path / "out"), "--control-image", str(tmp_path / "depth.png"), "--control-map")
    assert made.returncode == 0, made.stderr
    image = Image.open(Path(made.stdout.split()[0])).convert("L")
    assert image.size == (256, 256), "the control image's size"
    wanted = control_map(Control(photo, "depth", preprocess=False), (256, 256))
    inside = ImageStat.Stat(image.crop((80, 80, 176, 176))).mean[0]
    outside = ImageStat.Stat(image.crop((0, 0, 256, 48))).mean[0]
    assert outside - inside > 60 and wanted.getpixel((128, 128)) == 20, f"the map's dark square shows: {inside, outside}"
    refused = run_cli("--server", url, "generate", "x", "--model", "dev-depth", "--control-image",
                      str(tmp_path / "depth.png"), "--control-strength", "0.5")
    assert refused.returncode == 1 and "takes no control strength" in refused.stderr


def test_a_finished_image_is_upscaled_through_the_queue_and_keeps_its_content(processes):
    import io

    import requests
    from PIL import ImageChops

    from tests.conftest import submit, wait_status

    url = processes.server()
    processes.worker("--models", "schnell,dev-controlnet-upscaler")
    source = submit(url, prompt="a harbour", width=256, height=192, steps=2, format="PNG")
    wait_status(url, source, ("done",))
    made = requests.post(f"{url}/api/upscale", json={"task_id": source, "factor": 2}, timeout=10)
    assert made.status_code == 200, made.text
    task_id = made.json()["task_id"]
    done = wait_status(url, task_id, ("done",))
    assert (done["width"], done["height"], done["model"]) == (512, 384, "dev-controlnet-upscaler")
    images = [Image.open(io.BytesIO(requests.get(f"{url}/api/image", params={"task_id": t, "delete": "false"},
                                                 timeout=10).content)).convert("RGB") for t in (source, task_id)]
    assert images[1].size == (512, 384)
    back = images[1].resize(images[0].size, Image.Resampling.LANCZOS)
    assert sum(ImageStat.Stat(ImageChops.difference(back, images[0])).mean) < 20, "the source's content, larger"


def test_a_generate_request_with_upscale_ends_in_larger_images_of_its_own(processes):
    import io

    import requests
    from PIL import ImageChops

    from tests.conftest import wait_status

    url = processes.server()
    processes.worker("--models", "schnell,dev-controlnet-upscaler")
    made = requests.post(f"{url}/api/generate", json={
        "prompt": "a harbour", "width": 256, "height": 192, "steps": 2, "count": 2, "format": "PNG",
        "upscale": {"factor": 2, "steps": 2}}, timeout=10)
    assert made.status_code == 200, made.text
    source = made.json()["task_id"]
    done = wait_status(url, source, ("done",))
    assert len(done["upscale"]["task_ids"]) == 2, done
    stream = requests.get(f"{url}/api/tasks/{source}/events", timeout=10).text  # the task ended: it replays and ends
    ended = json.loads(stream.split("event: done\ndata: ")[1].split("\n")[0])
    assert ended["upscale"]["task_ids"] == done["upscale"]["task_ids"], "the done event names the upscale tasks"
    for index, task_id in enumerate(done["upscale"]["task_ids"]):
        upscaled = wait_status(url, task_id, ("done",))
        assert (upscaled["width"], upscaled["height"], upscaled["model"]) == (512, 384, "dev-controlnet-upscaler")
        assert upscaled["upscales"] == {"task_id": source, "index": index}
        images = [Image.open(io.BytesIO(requests.get(f"{url}/api/image", params={"task_id": t, "index": i,
                                                                                   "delete": "false"},
                                                     timeout=10).content)).convert("RGB")
                  for t, i in ((source, index), (task_id, 0))]
        back = images[1].resize(images[0].size, Image.Resampling.LANCZOS)
        assert sum(ImageStat.Stat(ImageChops.difference(back, images[0])).mean) < 20, "its own image, larger"
