"""The client: submit, follow (Server-Sent Events, or polling where a stream fails), fetch images, list, cancel.

Only the standard library: a script that `pip install`s mflux-server can talk to any server without extras.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mflux_server.client.errors import ServerError, TaskCanceled, TaskFailed

Progress = Callable[[dict[str, Any]], None]
ImageInput = str | Path | bytes
RETRIES = 3  # attempts after a connection reset or refusal, with a growing pause


def encode_image(value: ImageInput) -> str:
    """A path or bytes as base64 (what the server's `image`, `mask` and `images` fields take); strings may be data: URLs."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    text = str(value)
    if text.startswith("data:"):
        return text
    return base64.b64encode(Path(text).read_bytes()).decode()


class Client:
    """One mflux-server, e.g. Client("http://127.0.0.1:4030")."""

    def __init__(self, url: str = "http://127.0.0.1:4030", timeout: float = 30.0, retries: int = RETRIES):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries

    # HTTP

    def _open(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float | None = None,
              headers: dict[str, str] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={
            **({"Content-Type": "application/json"} if data is not None else {}), **(headers or {})})
        for attempt in range(self.retries + 1):
            try:
                return urllib.request.urlopen(request, timeout=timeout or self.timeout)
            except urllib.error.HTTPError as error:
                try:
                    payload = json.loads(error.read() or b"{}")
                except ValueError:
                    payload = {"message": error.reason}
                raise ServerError(error.code, payload) from None
            except (ConnectionResetError, ConnectionRefusedError, urllib.error.URLError) as error:
                reason = getattr(error, "reason", error)
                if attempt == self.retries or not isinstance(reason, (ConnectionResetError, ConnectionRefusedError)):
                    raise
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    # The API

    def submit(self, prompt: str, *, image: ImageInput | None = None, mask: ImageInput | None = None,
               images: list[ImageInput] | None = None, control_image: ImageInput | None = None,
               **fields: Any) -> dict[str, Any]:
        """Queue a task; fields are the generate endpoint's (model, width, height, steps, seed, count, …)."""
        body: dict[str, Any] = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
        if image is not None:
            body["image"] = encode_image(image)
        if mask is not None:
            body["mask"] = encode_image(mask)
        if images:
            body["images"] = [encode_image(item) for item in images]
        if control_image is not None:
            body["control_image"] = encode_image(control_image)
        result: dict[str, Any] = self._json("POST", "/api/generate", body)
        return result

    def status(self, task_id: str) -> dict[str, Any]:
        """A task's status, position and forecast."""
        result: dict[str, Any] = self._json("GET", f"/api/tasks/{urllib.parse.quote(task_id)}")
        return result

    def list(self, status: str | None = None, limit: int = 50) -> dict[str, Any]:
        """The queue and recent tasks."""
        query = urllib.parse.urlencode({k: v for k, v in {"status": status, "limit": limit}.items() if v is not None})
        result: dict[str, Any] = self._json("GET", f"/api/tasks?{query}")
        return result

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a waiting or running task, or delete a finished one."""
        result: dict[str, Any] = self._json("DELETE", f"/api/tasks/{urllib.parse.quote(task_id)}")
        return result

    def image(self, task_id: str, index: int = 0, delete: bool = False) -> bytes:
        """One image's bytes (by default kept on the server)."""
        query = urllib.parse.urlencode({"task_id": task_id, "index": index, "delete": str(delete).lower()})
        with self._open("GET", f"/api/image?{query}") as response:
            data: bytes = response.read()
            return data

    def events(self, task_id: str, last_event_id: str | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """The task's events as (id, kind, data) until it ends."""
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last_event_id} if last_event_id else {})}
        with self._open("GET", f"/api/tasks/{urllib.parse.quote(task_id)}/events", timeout=60, headers=headers) as stream:
            message: dict[str, str] = {}
            for raw in stream:
                line = raw.decode().rstrip("\r\n")
                if line:
                    if not line.startswith(":"):
                        field, _, value = line.partition(":")
                        message[field] = value.removeprefix(" ")
                    continue
                if "event" in message:
                    yield message.get("id", ""), message["event"], json.loads(message.get("data", "{}"))
                message = {}

    def wait(self, task_id: str, progress: Progress | None = None, poll: float = 0.5) -> dict[str, Any]:
        """Follow a task until done (its events; polling where the stream fails); raise if it fails or is canceled."""
        last_id: str | None = None
        for _ in range(self.retries + 1):
            try:
                for event_id, kind, data in self.events(task_id, last_id):
                    last_id = event_id or last_id
                    if progress is not None:
                        progress({"event": kind, **data})
                    if kind in ("done", "error", "deleted") or data.get("status") == "canceled":
                        break
                break
            except (OSError, ValueError):
                continue  # a dropped stream: resume from the last event, then fall back to polling
        while True:
            state = self.status(task_id)
            if state["status"] == "done":
                return state
            if state["status"] == "error":
                raise TaskFailed(task_id, state.get("error") or "unknown error")
            if state["status"] == "canceled":
                raise TaskCanceled(task_id)
            if progress is not None:
                progress({"event": "status", **state})
            time.sleep(poll)

    def final_images(self, done: dict[str, Any], progress: Progress | None = None) -> tuple[tuple[str, int], ...]:
        """Where a done task's images end up, as (task_id, index): its own, or, when it was submitted with an
        `upscale`, each upscale task's image (waited for)."""
        upscales: list[str] = (done.get("upscale") or {}).get("task_ids") or []
        for task_id in upscales:
            self.wait(task_id, progress)
        return tuple((task_id, 0) for task_id in upscales) or tuple((done["task_id"], index)
                                                                   for index in range(done["count"]))

    def generate(self, prompt: str, *, wait: bool = True, progress: Progress | None = None, as_pil: bool = True,
                 **fields: Any) -> Any:
        """Queue a prompt; with wait=True follow it and return its images (PIL images, or bytes with as_pil=False);
        with upscale={...}, the upscaled ones."""
        task = self.submit(prompt, **fields)
        if progress is not None:
            progress({"event": "submitted", **task})
        if not wait:
            return task
        try:
            done = self.wait(task["task_id"], progress)
        except ServerError as error:
            if error.status == 404:
                raise TaskCanceled(task["task_id"]) from None
            raise
        blobs = [self.image(task_id, index) for task_id, index in self.final_images(done, progress)]
        if not as_pil:
            return blobs
        from PIL import Image

        return [Image.open(io.BytesIO(blob)) for blob in blobs]


class AsyncClient:
    """The same calls for asyncio: each runs the blocking client on a worker thread."""

    def __init__(self, url: str = "http://127.0.0.1:4030", timeout: float = 30.0, retries: int = RETRIES):
        self.sync = Client(url, timeout, retries)

    async def generate(self, prompt: str, **kwargs: Any) -> Any:
        """See Client.generate."""
        return await asyncio.to_thread(self.sync.generate, prompt, **kwargs)

    async def submit(self, prompt: str, **kwargs: Any) -> dict[str, Any]:
        """See Client.submit."""
        return await asyncio.to_thread(self.sync.submit, prompt, **kwargs)

    async def status(self, task_id: str) -> dict[str, Any]:
        """See Client.status."""
        return await asyncio.to_thread(self.sync.status, task_id)

    async def wait(self, task_id: str, progress: Progress | None = None) -> dict[str, Any]:
        """See Client.wait."""
        return await asyncio.to_thread(self.sync.wait, task_id, progress)

    async def cancel(self, task_id: str) -> dict[str, Any]:
        """See Client.cancel."""
        return await asyncio.to_thread(self.sync.cancel, task_id)
