"""What the generation thread tells the result writer: typed messages, never bare tuples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from PIL import Image

from mflux_server.core.rows import Task


@dataclass(frozen=True, slots=True)
class ImageGenerated:
    """One image of a task is ready to encode; the task is stored as done with its last image."""

    task: Task
    index: int
    image: Image.Image
    started: float  # wall clock around the engine's generate
    ended: float
    after_seconds: float  # from the last denoising step until the engine returned the image
    software: str  # written into the file: which engine and model made it (the model changes when the worker switches)


@dataclass(frozen=True, slots=True)
class TaskDropped:
    """The task was canceled or taken over: forget the images generated so far."""

    task: Task


@dataclass(frozen=True, slots=True)
class TaskReleased:
    """The worker is stopping: put the task back in line."""

    task: Task


@dataclass(frozen=True, slots=True)
class TaskFailed:
    """The engine failed on this task: mark it error with the message."""

    task: Task
    message: str


class Shutdown:
    """The last message: everything before it has been written."""

    def __repr__(self) -> str:
        return "SHUTDOWN"


SHUTDOWN: Final = Shutdown()

Message = ImageGenerated | TaskDropped | TaskReleased | TaskFailed | Shutdown
