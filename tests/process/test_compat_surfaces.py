"""The compatible surfaces over real HTTP, each with its own client shape: the official `openai` package, and the
seeds' curl and `requests` bodies for AceDataCloud and NebulaBlock. Every request is an ordinary task."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import requests
from PIL import Image

from mflux_server.testing import TEST_WEBHOOK_SECRET, WebhookReceiver, fresh_queue, wait_for

MODELS = ("--model", "schnell", "--models", "schnell,dev,dev-kontext,dev-fill")


def png(size: tuple[int, int] = (256, 256), mode: str = "RGB", color: object = (200, 40, 40), fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, fmt)  # type: ignore[arg-type]
    return out.getvalue()


def picture(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """One API and worker for the tests that only send requests (starting them is most of a test's time)."""
    with fresh_queue() as procs:
        url = procs.server("--webhook-secret", TEST_WEBHOOK_SECRET, "--webhook-allow-private")
        procs.worker(*MODELS, speed=50)
        yield url


def test_openai_generations_answer_b64_json_and_lasting_urls(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused")
    result = client.images.generate(prompt="a lighthouse", n=2, size="256x256", response_format="b64_json")
    assert len(result.data) == 2 and result.created > 0
    images = [picture(base64.b64decode(item.b64_json)) for item in result.data]  # type: ignore[arg-type]
    assert [image.size for image in images] == [(256, 256)] * 2 and images[0].format == "PNG"
    assert images[0].tobytes() != images[1].tobytes(), "image k uses seed + k"

    linked = client.images.generate(model="dall-e-3", prompt="a harbour", size="320x192", quality="hd")
    link = linked.data[0].url
    assert link and link.startswith(served)
    for _ in range(2):  # a url is not consumed by fetching it
        fetched = requests.get(link, timeout=10)
        assert fetched.status_code == 200 and picture(fetched.content).size == (320, 192)
    task_id = link.split("task_id=")[1].split("&")[0]
    task = requests.get(f"{served}/api/status", params={"task_id": task_id}, timeout=10).json()
    assert (task["status"], task["model"], task["steps"]) == ("done", "schnell", 6), "hd is 1.5× the model's steps"
    assert [m.id for m in client.models.list().data] == ["dev", "dev-fill", "dev-kontext", "schnell"]


def test_openai_edits_repaint_the_transparent_part_of_the_mask_with_an_inpaint_model(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused")
    mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (64, 64, 192, 192))  # transparent: edit here
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    filled = client.images.edit(image=("cat.png", png()), mask=("mask.png", buffer.getvalue()), prompt="a hat",
                                response_format="url")
    task_id = filled.data[0].url.split("task_id=")[1].split("&")[0]  # type: ignore[union-attr]
    assert requests.get(f"{served}/api/status", params={"task_id": task_id}, timeout=10).json()["model"] == "dev-fill"
    edited = client.images.edit(image=("cat.png", png()), prompt="make it blue", response_format="url")
    task_id = edited.data[0].url.split("task_id=")[1].split("&")[0]  # type: ignore[union-attr]
    task = requests.get(f"{served}/api/status", params={"task_id": task_id}, timeout=10).json()
    assert (task["model"], task["width"], task["height"]) == ("dev-kontext", 256, 256), "the size follows the image"


@pytest.mark.parametrize("arguments, param", [
    ({"size": "100x100"}, "size"), ({"size": "big"}, "size"), ({"n": 99}, "n"), ({"response_format": "gif"}, "response_format"),
    ({"model": "no-such-model"}, "model"), ({"quality": "ultra"}, "quality"), ({"output_format": "svg"}, "output_format"),
    ({"background": "transparent"}, "background"), ({"extra_body": {"colour": "red"}}, "colour"),
    ({"prompt": ""}, "prompt"),
])
def test_openai_bad_fields_are_400s_in_openais_envelope_naming_the_param(served, arguments, param):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    arguments = {"prompt": "x", **arguments}
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(**arguments)
    error = raised.value.body
    assert isinstance(error, dict) and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"]


def test_openai_envelope_covers_errors_before_the_view(served):
    not_json = requests.post(f"{served}/v1/images/generations", data="prompt=x", timeout=10,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert not_json.status_code == 415 and set(not_json.json()["error"]) == {"message", "type", "param", "code"}
    wrong_method = requests.get(f"{served}/v1/images/generations", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    broken = requests.post(f"{served}/v1/images/generations", data=b"{", timeout=10,
                           headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"


def test_a_waiting_openai_request_is_an_ordinary_task_that_can_be_canceled(processes):
    url = processes.server()
    processes.worker(speed=0.2)  # slow: the request waits while we look at its task
    answers: list[requests.Response] = []
    threading.Thread(target=lambda: answers.append(requests.post(
        f"{url}/v1/images/generations", json={"prompt": "slow one", "size": "1024x1024"}, timeout=60)), daemon=True).start()
    listed = wait_for(lambda: requests.get(f"{url}/api/tasks", timeout=5).json()["tasks"], what="the task to be queued")
    task = listed[0]
    assert task["prompt"] == "slow one"
    status = requests.get(f"{url}/api/status", params={"task_id": task["task_id"]}, timeout=5).json()
    assert "wait_remaining" in status and "pos" in status
    assert requests.delete(f"{url}/api/tasks/{task['task_id']}", timeout=5).status_code == 200
    wait_for(lambda: answers, what="the waiting request to answer")
    assert answers[0].status_code == 409 and answers[0].json()["error"]["code"] == "task_canceled"


def test_acedata_seed_bodies_generate_and_edit(served):
    # The seed's curl body, unchanged: Kontext names generate on FLUX.1 dev (Kontext itself needs an image).
    generated = requests.post(f"{served}/flux/images", timeout=60, headers={"authorization": "Bearer {token}",
                              "accept": "application/json"},
                              json={"action": "generate", "prompt": "a white siamese cat", "model": "flux-kontext-pro",
                                    "count": 2}).json()
    assert generated["success"] is True and generated["task_id"] and generated["trace_id"]
    assert [item["prompt"] for item in generated["data"]] == ["a white siamese cat"] * 2
    first = generated["data"][0]
    assert first["seed"] + 1 == generated["data"][1]["seed"] and first["timings"]["inference"] >= 0
    assert picture(requests.get(first["image_url"], timeout=10).content).size == (1024, 1024)
    record = requests.post(f"{served}/flux/tasks", json={"id": generated["task_id"]}, timeout=10).json()
    assert record["status"] == "done" and record["request"]["model"] == "dev" and record["response"] == generated

    # The seed's requests body names an https URL: not fetched unless the operator allows it.
    seed_edit = requests.post(f"{served}/flux/images", timeout=30, json={
        "action": "edit", "prompt": "a white siamese cat", "model": "flux-kontext-pro",
        "image_url": "https://cdn.acedata.cloud/ytj2qy.png"})
    assert seed_edit.status_code == 400
    assert seed_edit.json()["error"]["field"] == "image_url" and "--fetch-image-urls" in seed_edit.json()["error"]["message"]
    data_url = "data:image/png;base64," + base64.b64encode(png((320, 256))).decode()
    edited = requests.post(f"{served}/flux/images", timeout=60, json={
        "action": "edit", "prompt": "a white siamese cat", "model": "flux-kontext-max", "image_url": data_url}).json()
    assert edited["success"] and picture(requests.get(edited["data"][0]["image_url"], timeout=10).content).size == (320, 256)
    batch = requests.post(f"{served}/flux/tasks", timeout=10, json={
        "action": "retrieve_batch", "ids": [generated["task_id"], edited["task_id"], "unknown"]}).json()
    assert batch["count"] == 2 and [item["request"]["action"] for item in batch["items"]] == ["generate", "edit"]


@pytest.mark.parametrize("body, status, code, field", [
    ({"prompt": "x", "model": "flux-pro-ultra"}, 400, "bad_request", "model"),
    ({"prompt": "x", "action": "upscale"}, 400, "api_not_implemented", "action"),
    ({"model": "flux-dev"}, 400, "bad_request", "prompt"),
    ({"prompt": "x", "size": "12x12"}, 400, "bad_request", "size"),
    ({"prompt": "x", "count": "many"}, 400, "bad_request", "count"),
    ({"prompt": "x", "callback_url": "ftp://example.com"}, 400, "bad_request", "callback_url"),
    ({"prompt": "x", "action": "edit"}, 400, "bad_request", "image_url"),
])
def test_acedata_bad_input_in_their_envelope(served, body, status, code, field):
    answer = requests.post(f"{served}/flux/images", json=body, timeout=10)
    assert answer.status_code == status
    error = answer.json()
    assert error["success"] is False and error["trace_id"]
    assert (error["error"]["code"], error["error"]["field"]) == (code, field)


def test_acedata_callback_answers_at_once_and_posts_the_signed_result(served):
    receiver = WebhookReceiver()
    try:
        answer = requests.post(f"{served}/flux/images", timeout=10, json={
            "action": "generate", "prompt": "a white siamese cat", "model": "flux-schnell", "size": "256x256",
            "callback_url": receiver.url}).json()
        assert list(answer) == ["task_id"]
        wait_for(lambda: receiver.received, what="the callback")
        _, headers, body = receiver.received[0]
        assert body["success"] is True and body["task_id"] == answer["task_id"]
        assert body["data"][0]["timings"]["inference"] >= 0 and "seed" in body["data"][0]
        assert headers["webhook-id"] == "msg_" + answer["task_id"].replace("-", "")
        task = requests.post(f"{served}/flux/tasks", json={"id": answer["task_id"]}, timeout=10).json()
        assert task["response"] == body
    finally:
        receiver.close()


class ImageOrigin(BaseHTTPRequestHandler):
    """Serves one PNG at any path."""

    def do_GET(self) -> None:
        data = png((256, 192))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_acedata_image_url_is_fetched_when_the_operator_allows_it(processes):
    origin = ThreadingHTTPServer(("127.0.0.1", 0), ImageOrigin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    try:
        strict = processes.server("--fetch-image-urls")  # fetching on, private addresses still refused
        body = {"action": "edit", "prompt": "p", "model": "flux-kontext-pro",
                "image_url": f"http://127.0.0.1:{origin.server_port}/in.png"}
        refused = requests.post(f"{strict}/flux/images", json=body, timeout=10)
        assert refused.status_code == 400 and "loopback" in refused.json()["error"]["message"]
        allowed = processes.server("--fetch-image-urls", "--fetch-allow-private")
        processes.worker(*MODELS, speed=50)
        edited = requests.post(f"{allowed}/flux/images", json=body, timeout=60).json()
        assert edited["success"] is True
        assert picture(requests.get(edited["data"][0]["image_url"], timeout=10).content).size == (256, 192)
    finally:
        origin.shutdown()
        origin.server_close()


def test_nebula_seed_bodies(served):
    jpeg = base64.b64encode(png((256, 256), fmt="JPEG")).decode()
    mask = base64.b64encode(png((256, 256), mode="L", color=255, fmt="JPEG")).decode()
    filled = requests.post(f"{served}/api/v1/images/generation", timeout=60, headers={"Authorization": "Bearer k"}, json={
        "model": "black-forest-labs/FLUX.1-Fill-dev", "prompt": "a red baseball cap", "num_steps": 4,
        "guidance_scale": 4.5, "width": 256, "height": 256, "image": jpeg, "mask": mask}).json()
    assert (filled["status"], filled["object"], filled["model"]) == ("success", "list", "black-forest-labs/FLUX.1-Fill-dev")
    [item] = filled["data"]
    assert item["index"] == 0 and item["timings"]["inference"] >= 0
    assert picture(base64.b64decode(item["b64_json"])).size == (256, 256)
    # Their text-to-image example is a GET with a body, for a model mflux does not run: a clear 400 naming it.
    sdxl = requests.get(f"{served}/api/v1/images/generation", timeout=10, json={
        "model": "stabilityai/stable-diffusion-xl-base-1.0", "prompt": "insert your prompt here", "num_steps": 25,
        "guidance_scale": 9, "width": 1024, "height": 1024, "negative_prompt": None})
    assert sdxl.status_code == 400 and sdxl.json()["param"] == "model" and sdxl.json()["status"] == "error"
    schnell = requests.get(f"{served}/api/v1/images/generation", timeout=60, json={
        "model": "black-forest-labs/FLUX.1-schnell", "prompt": "insert your prompt here", "num_steps": 2,
        "width": 512, "height": 512, "negative_prompt": None}).json()
    assert schnell["status"] == "success" and picture(base64.b64decode(schnell["data"][0]["b64_json"])).size == (512, 512)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "num_steps": 0}, "num_steps"), ({"prompt": "x", "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": "x", "width": 100}, "width"), ({"prompt": "x", "image": "not base64!"}, "image"),
    ({"prompt": "x", "style": "noir"}, "style"), ({"num_steps": 4}, "prompt"),
])
def test_nebula_bad_input_in_their_shape(served, body, param):
    answer = requests.post(f"{served}/api/v1/images/generation", json=body, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["status"] == "error" and answer.json()["param"] == param and answer.json()["message"]
