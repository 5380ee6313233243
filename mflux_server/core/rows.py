"""Typed rows of the queue: what the store hands out instead of row dicts, and the task Status."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, fields
from typing import Any, NamedTuple, Self


class Status(enum.StrEnum):
    """Where a task is in its lifecycle: waiting → processing → done | error; waiting | processing → canceled."""

    WAITING = "waiting"
    PROCESSING = "processing"
    DONE = "done"
    ERROR = "error"
    CANCELED = "canceled"

    @property
    def unfinished(self) -> bool:
        """True while a worker may still run the task."""
        return self in (Status.WAITING, Status.PROCESSING)


class Removal(enum.StrEnum):
    """What DELETE did to a task."""

    CANCELED = "canceled"
    DELETED = "deleted"


class FromRow:
    """Mixed into a row dataclass: build it from a store's row (by column name) holding (at least) its field names."""

    __slots__ = ()

    @classmethod
    def from_row(cls, row: Any) -> Self:
        """The row as this dataclass."""
        return cls(**{f.name: row[f.name] for f in fields(cls)})  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class NewTask:
    """A validated request, ready to be queued."""

    prompt: str
    model: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    count: int
    format: str
    quality: int
    priority: int = 0
    negative_prompt: str | None = None
    image_strength: float | None = None
    guidance_auto: bool = False  # no guidance was given: the engine lets the model pick its own
    inputs: tuple[InputImage, ...] = ()
    surface: str = "native"  # the API it came through: native, openai, acedata or nebula
    callback_url: str | None = None  # POSTed (signed) when the task ends
    link_base: str | None = None  # the server's URL as the client reached it, for image links
    keep_for: float | None = None  # seconds a finished task is kept for its image links, then removed
    client_user: str | None = None
    key_id: int | None = None  # the API key that submitted it
    fair_cost: float | None = None  # forecast engine seconds, for its fair tag; None: first-in first-out
    loras: str = ""  # the LoRAs asked for, lora_set_text()'s JSON; "" for none (the worker's default set)
    control: str = ""  # ControlNet or depth settings, ControlSettings.text(); "" for none
    image_strengths: str = ""  # variations: each image prompt's strength, a JSON list; "" for the model's default
    private: bool = False  # its images leave the prompt out of their metadata
    then_upscale: str = ""  # UpscaleAfter.text(): the upscale each image gets once the task is done; "" for none
    upscales_task: str | None = None  # an upscale queued by that: the task whose image it enlarges
    upscales_index: int | None = None  # and which of its images


class UpscaleAfter(NamedTuple):
    """What a generate request's `upscale` asks for each of its images once the task is done."""

    model: str
    width: int
    height: int
    steps: int
    guidance: float | None = None  # the upscaler's default, as POST /api/upscale gives it; None: its own choice
    # Each upscale's charge to its key under fair scheduling (engine seconds, priced at submit, since the worker
    # that queues it has no cost model); None: first in, first out, as the task itself was queued.
    fair_cost: float | None = None

    def text(self) -> str:
        """The tasks.then_upscale column."""
        return json.dumps(self._asdict(), separators=(",", ":"))

    @classmethod
    def of(cls, text: str) -> UpscaleAfter | None:
        """The column read back; None for ''."""
        return cls(**json.loads(text)) if text else None


class ControlSettings(NamedTuple):
    """How a task uses its control image: the map type, the strength (None: the model takes none) and whether
    the worker turns the image into the map (preprocess) or it is the map already."""

    kind: str
    strength: float | None
    preprocess: bool

    def text(self) -> str:
        """The tasks.control column."""
        return json.dumps({"type": self.kind, "strength": self.strength, "preprocess": self.preprocess},
                          separators=(",", ":"))

    @classmethod
    def of(cls, text: str) -> ControlSettings | None:
        """The tasks.control column read back; None for ''."""
        if not text:
            return None
        data = json.loads(text)
        return cls(str(data["type"]), data["strength"], bool(data["preprocess"]))


# LoRAs by library name with their scales, in the order given (the order mflux applies them in).
LoraSet = tuple[tuple[str, float], ...]


def lora_set_text(loras: LoraSet) -> str:
    """The tasks.loras column: a JSON list of [name, scale], or "" for none."""
    return json.dumps([[name, scale] for name, scale in loras], separators=(",", ":")) if loras else ""


def lora_set_of(text: str) -> LoraSet:
    """The tasks.loras column read back."""
    return tuple((str(name), float(scale)) for name, scale in json.loads(text)) if text else ()


# The roles of an edit's further reference images, after 'image' (migration 0005 allows exactly these).
REFERENCE_ROLES = ("image2", "image3", "image4")
# The role of a ControlNet's or depth model's control image (migration 0018).
CONTROL_ROLE = "control"


@dataclass(frozen=True, slots=True)
class InputImage(FromRow):
    """An image a task was submitted with: the picture to start from or edit ('image'), more edit references
    ('image2' to 'image4'), the inpaint 'mask', or the 'control' image."""

    role: str
    mime: str
    width: int
    height: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Task(FromRow):
    """One row of the tasks table."""

    seq: int
    id: str
    status: Status
    priority: int
    model: str
    prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    count: int
    format: str
    quality: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker_id: str | None
    attempts: int
    image_index: int
    step: int
    step_at: float | None
    engine: str | None
    error: str | None
    negative_prompt: str | None
    image_strength: float | None
    guidance_auto: int
    surface: str
    callback_url: str | None
    link_base: str | None
    keep_for: float | None
    client_user: str | None
    key_id: int | None
    fair_tag: float
    fair_start: float
    input_count: int = 0  # input images it was submitted with (the worker reads them only when there are some)
    loras: str = ""  # the LoRAs asked for (lora_set_text's JSON), "" for none
    control: str = ""  # ControlSettings.text(), "" for none
    image_strengths: str = ""  # variations: each image prompt's strength (JSON list), "" for the default
    private: int = 0  # 1: its images leave the prompt out of their metadata
    then_upscale: str = ""  # UpscaleAfter.text(), "" for none
    upscales_task: str | None = None  # the task whose image this upscale enlarges (queued by its then_upscale)
    upscales_index: int | None = None

    def __post_init__(self) -> None:
        # sqlite hands the status back as a plain string; the enum is what everyone compares with.
        object.__setattr__(self, "status", Status(self.status))

    @property
    def lora_set(self) -> LoraSet:
        """The LoRAs asked for, in order, with their scales."""
        return lora_set_of(self.loras)

    @property
    def strengths(self) -> tuple[float, ...]:
        """Each image prompt's strength, in order (empty: the model's default)."""
        return tuple(float(value) for value in json.loads(self.image_strengths)) if self.image_strengths else ()

    @property
    def control_settings(self) -> ControlSettings | None:
        """How it uses its control image, if it has one."""
        return ControlSettings.of(self.control)


@dataclass(frozen=True, slots=True)
class Worker(FromRow):
    """One row of the workers table: a generation process, registered afresh at each start."""

    id: str
    hostname: str
    pid: int
    engine: str
    model: str
    quantize: int | None
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    models: str  # comma-separated: every model it may load; `model` is the one loaded now
    max_pixels: int | None  # the largest image (width × height) it can run, when known
    loading: str | None  # the model it is loading right now
    affinity_wait: float | None  # seconds a task for another model waits before this worker switches for it
    pixel_limits: str  # comma-separated model=pixels: each model's largest image here, from its memory need
    loras: str = ""  # the LoRA set it holds now (tasks.loras' text), "" for its default set

    def limit_for(self, model: str) -> int | None:
        """The largest image (width × height) this worker runs with a model: its cap, lowered per model."""
        limits = dict(item.rsplit("=", 1) for item in self.pixel_limits.split(",") if "=" in item)
        candidates = [int(limits[model])] if model in limits else []
        candidates += [self.max_pixels] if self.max_pixels else []
        return min(candidates) if candidates else None

    @property
    def servable(self) -> tuple[str, ...]:
        """Every model this worker may serve, the loaded one first."""
        # model is empty while the worker holds nothing (after a model failed to load)
        return tuple(name for name in dict.fromkeys((self.model, *self.models.split(","))) if name)


@dataclass(frozen=True, slots=True)
class LoadStat(FromRow):
    """How long loading a model (and warming it up) took."""

    model: str
    n: int
    total: float
    last: float


@dataclass(frozen=True, slots=True)
class StoredImage(FromRow):
    """One encoded image of a task, on its way into the database or out of it."""

    idx: int
    seed: int
    mime: str
    data: bytes
    gen_started: float  # wall clock around the engine's generate, for duty-cycle figures
    gen_ended: float
    credentials: int = 0  # 1: signed C2PA Content Credentials are embedded


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds measured for one kind of cost (step, before, after, encode)."""

    kind: str
    seconds: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class TimingStat(FromRow):
    """Aggregated timings of one model, size and kind: what the cost model is fitted to."""

    model: str
    width: int
    height: int
    kind: str
    n: int
    total: float
    total_sq: float = 0.0  # sum of squared seconds: the spread around the fit gives the forecast's range


@dataclass(frozen=True, slots=True)
class ForecastOutcome(FromRow):
    """A finished task's forecast at submit, the top of the model's own range then, and the seconds it took: what
    the calibration learns from."""

    point: float
    took: float
    high: float | None = None  # None for a task an older API forecast


# Not frozen: a snapshot reads 10,000 of these, and a frozen dataclass costs 6 ms per 10,000 where a
# plain slots one costs 0.9 ms. Nothing mutates them.
@dataclass(slots=True)
class QueueEntry:
    """A waiting task as the forecast sees it."""

    model: str
    priority: int
    seq: int
    width: int
    height: int
    steps: int
    count: int
    created_at: float
    fair_tag: float = 0.0
    fair_start: float = 0.0  # where its key's backlog began: among equal tags, the later goes first
    loras: str = ""  # its LoRA set (tasks.loras' text): a worker groups its work by model and set


@dataclass(slots=True)
class Arrival:
    """A submission as the forecast's arrival log sees it, whatever its status now (not frozen: see QueueEntry)."""

    seq: int
    model: str
    priority: int
    width: int
    height: int
    steps: int
    count: int
    created_at: float


class WaitingHead(NamedTuple):
    """The front of one variant's (model and LoRA set's) waiting tasks at one priority, and the work behind it."""

    model: str
    priority: int
    seq: int  # the first in claim order
    created_at: float  # when that first one was submitted
    tasks: int
    images: int
    loras: str = ""  # the LoRA set, tasks.loras' text


class ClaimKey(NamedTuple):
    """Claim order: higher priority first, the smaller fair tag, the newer backlog, first in; smaller goes first."""

    neg_priority: int
    tag: float
    neg_start: float  # minus where the key's backlog began: among equal tags, the newer backlog goes first
    seq: int

    @classmethod
    def of(cls, priority: int, seq: int, tag: float = 0.0, start: float = 0.0) -> ClaimKey:
        """The key of a task with this priority, sequence number, fair tag and backlog start."""
        return cls(-priority, tag, -start, seq)


class QueueRead(NamedTuple):
    """Every waiting task in claim order, read in one transaction with the newest seq and the change counter."""

    entries: list[QueueEntry]
    max_seq: int
    changes: int


class Recovery(NamedTuple):
    """What recovery did to one task held by a dead worker."""

    task_id: str
    status: Status


@dataclass(frozen=True, slots=True)
class Event(FromRow):
    """A change a client may watch (status, progress, preview, done, error, deleted), in events-table order."""

    id: int
    task_id: str
    kind: str
    data: str  # a JSON object
    at: float


@dataclass(frozen=True, slots=True)
class Preview(FromRow):
    """The latest preview of a running task: a small JPEG of its current latents."""

    task_id: str
    image: int
    step: int
    mime: str
    data: bytes
    at: float


class DeliveryState(enum.StrEnum):
    """Where a webhook is: pending (due or retrying), delivered (a 2xx), failed (retries used up)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Delivery(FromRow):
    """One row of the webhook outbox: where to POST, a snapshot of the ended task, and how the attempts went."""

    id: str  # the webhook-id header
    task_id: str
    url: str
    surface: str
    task: str  # JSON snapshot of the task as it ended
    state: DeliveryState
    attempts: int
    next_at: float
    lease_until: float | None
    last_status: int | None
    last_error: str | None
    created_at: float
    delivered_at: float | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", DeliveryState(self.state))


@dataclass(frozen=True, slots=True)
class ApiKey(FromRow):
    """One row of api_keys: a named key (its hash only), what it may do, and when it was used."""

    id: int
    name: str
    hash: str
    admin: int
    priority: int
    created_at: float
    last_used_at: float | None
    revoked_at: float | None
