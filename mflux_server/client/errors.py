"""Typed errors from the server's JSON error bodies (code, message, field) and from tasks that end badly."""

from __future__ import annotations

from typing import Any


class ServerError(Exception):
    """The server answered with an error: its HTTP status, `code` (e.g. invalid_input), `field` and message."""

    def __init__(self, status: int, body: dict[str, Any]):
        self.status = status
        self.code: str = str(body.get("code", "error"))
        self.field: str | None = body.get("field")
        self.body = body
        message = str(body.get("message", f"HTTP {status}"))
        super().__init__(f"{status} {self.code}: {message}")


class TaskFailed(Exception):
    """The task ended in `error`; the message is the server's reason."""

    def __init__(self, task_id: str, reason: str):
        self.task_id = task_id
        super().__init__(f"task {task_id} failed: {reason}")


class TaskCanceled(Exception):
    """The task was canceled (or deleted) before its images were done."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        super().__init__(f"task {task_id} was canceled")
