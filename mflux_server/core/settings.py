"""One settings object for both processes, from command-line flags, then MFLUX_SERVER_* variables, then defaults."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mflux_server import store

ENV_PREFIX = "MFLUX_SERVER_"
WEBHOOK_SECRET = re.compile(r"whsec_[A-Za-z0-9+/]{32,}={0,2}")
QUANTIZE_CHOICES = ("3", "4", "5", "6", "8", "none")
ENGINES = ("auto", "mflux", "synthetic")
VAE_DECODES = ("auto", "legacy", "full_precision", "low_memory")
# Seconds per denoising step as a + b·mp + c·mp² (mp = pixels / 2**20): FLUX.1-schnell bf16 measured on an
# H100 (../shared/data/flux1-h100-timings.csv). The synthetic engine's default and the forecast's prior.
H100_STEP_COST = (0.107, 0.350, 0.098)


def default_db_path() -> str:
    """The queue file both processes use unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "mflux-server", "queue.db")


def _floats(count: int) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        parts = [p for p in str(text).replace(" ", "").split(",") if p]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, got {text!r}") from None
        if len(values) != count or any(v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated non-negative numbers, got {text!r}")
        return values

    parse.__name__ = f"{count} numbers"
    return parse


def _quantize(text: str) -> int | None:
    text = str(text).strip().lower()
    if text not in QUANTIZE_CHOICES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(QUANTIZE_CHOICES)}, got {text!r}")
    return None if text == "none" else int(text)


def _bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _list(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        return [kind(p) for p in str(text).replace(",", " ").split() if p]

    parse.__name__ = "list"
    return parse


def _at_least(kind: Callable[[str], Any], low: float, inclusive: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < low or (value == low and not inclusive):
            rule = f"{low:g} or more" if inclusive else f"greater than {low:g}"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return _at_least(kind, 0, inclusive=False)


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return _at_least(kind, 0, inclusive=True)


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if str(text).strip().lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def setting(default: Any, help: str, roles: str = "api,worker", parse: Callable[[str], Any] = str) -> Any:
    """Declare one setting: its default, its help, which processes read it and how to parse it."""
    return field(default=default, metadata={"help": help, "roles": roles.split(","), "parse": parse})


@dataclass
class Settings:
    """Everything either process can be told; see the table in docs/configuration.md."""

    host: str = setting("127.0.0.1", "address the API listens on", "api")
    port: int = setting(4030, "port the API listens on", "api", _positive(int))
    db: str = setting(default_db_path(), "the queue shared by the API and the workers: an SQLite file, or a postgresql:// URL")
    model: str = setting("schnell", "model the worker loads first; also the API's default for requests without one")
    models: list[str] = setting(None, "every model this worker may switch to, comma separated (--model is loaded first)",
                                "worker", _list(str))
    max_affinity_wait: float = setting(
        120.0, "seconds a task for another model may wait before the worker switches models for it", "worker",
        _non_negative(float))
    max_pixels: int = setting(1536 * 1536, "largest image (width × height) this worker runs; lowered per model by its "
                              "memory need and after out-of-memory", "worker", _positive(int))
    gpu_memory: float | None = setting(
        None, "GiB of accelerator memory the model may use, which sets each model's largest image from its measured "
        "need (default: what the device reports; none for the synthetic engine)", "worker", _optional(_positive(float)))
    debug: bool = setting(False, "serve with Flask's development server and debugger (never in production)", "api", _bool)
    http_workers: int = setting(2, "API server processes (gunicorn workers)", "api", _positive(int))
    max_connections: int = setting(1000, "open connections each API server process holds at most (event streams and "
                                   "idle keep-alives included); more wait to be accepted", "api", _positive(int))
    header_timeout: float = setting(10.0, "seconds from a request's first byte for its headers to arrive; then a 408",
                                    "api", _positive(float))
    request_timeout: float = setting(60.0, "seconds from a request's first byte for all of it, body included, to arrive; "
                                     "then a 408", "api", _positive(float))
    max_width: int = setting(2048, "largest width a request may ask for", "api", _positive(int))
    max_height: int = setting(2048, "largest height a request may ask for", "api", _positive(int))
    max_steps: int = setting(100, "most denoising steps a request may ask for", "api", _positive(int))
    max_count: int = setting(8, "most images one request may ask for", "api", _positive(int))
    max_prompt_length: int = setting(4000, "longest prompt, in characters", "api", _positive(int))
    max_input_bytes: int = setting(20 * 2**20, "largest input image or mask, in bytes", "api", _positive(int))
    max_input_pixels: int = setting(4096 * 4096, "largest input image or mask, in pixels", "api", _positive(int))
    stale_after: float = setting(15.0, "seconds without a heartbeat before a worker counts as dead", parse=_positive(float))
    write_lock_limit: float | None = setting(
        5.0, "seconds one process may hold the queue's write lock inside a transaction; past it a frozen worker is "
        "stopped (SQLite: SIGKILL by the API; PostgreSQL: the server ends the session) so that submits go on; none "
        "for no limit", parse=_optional(_positive(float)))
    engine: str = setting("auto", "mflux, synthetic, or auto (mflux where MLX has a GPU, else synthetic)", "worker")
    quantize: int | None = setting(None, "quantize the model to 3, 4, 5, 6 or 8 bits, or none", "worker", _quantize)
    model_path: str | None = setting(None, "load weights from this local folder instead of the Hugging Face cache", "worker")
    lora_paths: list[str] = setting(None, "LoRA .safetensors files to apply (space or comma separated)", "worker", _list(str))
    lora_scales: list[float] = setting(None, "scale of each LoRA, in the same order", "worker", _list(float))
    lora_dir: str | None = setting(
        None, "a folder of LoRA .safetensors files that requests may name (loras), listed by GET /api/loras; give the "
        "API and every worker the same folder", parse=_optional(str))
    metadata_prompts: bool = setting(
        True, "write each task's prompt into its images' metadata (false: never; a request's private does it per "
        "task); the AI-generated marking is always written", "api", _bool)
    c2pa: bool = setting(True, "sign every image with C2PA Content Credentials (false: only the XMP marking)", "worker",
                         _bool)
    c2pa_cert: str | None = setting(None, "PEM certificate chain (signer first) for Content Credentials; without it "
                                    "and --c2pa-key a local, self-signed one is made in --c2pa-dir", "worker",
                                    _optional(str))
    c2pa_key: str | None = setting(None, "PEM private key of --c2pa-cert's signer", "worker", _optional(str))
    c2pa_dir: str | None = setting(None, "where a worker keeps its self-signed credentials (default: "
                                   "mflux-server-c2pa beside the SQLite file, else $XDG_DATA_HOME/mflux-server/c2pa, "
                                   "~/.local/share by default)", "worker", _optional(str))
    lora_hub: bool = setting(
        False, "also accept Hugging Face references (org/repo, org/repo:file.safetensors) as LoRA names; workers "
        "download them with mflux (give the API and every worker this flag)", parse=_bool)
    gpu_cache_limit: float | None = setting(
        None, "GiB of freed GPU buffers MLX may keep cached (like the original server's --cache_limit)", "worker",
        _optional(_non_negative(float)))
    vae_decode: str = setting("auto", "VAE decode path: auto (by free memory), legacy, full_precision or low_memory",
                              "worker")
    warm_up_size: int = setting(256, "side of the square image the mflux engine generates once at each load, so kernel "
                                "compilation counts as load time (a multiple of 16)", "worker", _positive(int))
    warm_up_steps: int = setting(2, "denoising steps of that warm-up generation; 0 skips it", "worker",
                                 _non_negative(int))
    synthetic_step: tuple[float, float, float] = setting(
        H100_STEP_COST, "synthetic engine: seconds per step as a,b,c in a + b·mp + c·mp²", "worker", _floats(3)
    )
    synthetic_load: float = setting(0.0, "synthetic engine: seconds to load a model", "worker", _non_negative(float))
    synthetic_lora_change: float = setting(0.0, "synthetic engine: seconds to change the LoRA set held (mflux reloads)",
                                           "worker", _non_negative(float))
    synthetic_max_pixels: int | None = setting(
        None, "synthetic engine: run out of memory above this many pixels, breaking until reset", "worker",
        _optional(_positive(int)))
    synthetic_fixed: tuple[float, float] = setting(
        (0.2, 0.1), "synthetic engine: seconds before,after the denoising loop", "worker", _floats(2)
    )
    synthetic_noise: float = setting(0.0, "synthetic engine: random ± fraction on every duration", "worker", float)
    synthetic_profiles: str | None = setting(
        None, "synthetic engine: a JSON file of per-model timings {model: {step: [a,b,c], fixed: [before,after], load, "
        "cold, drift}} (bench/traces.py writes one from the H100 measurements)", "worker", _optional(str))
    synthetic_speed: float = setting(1.0, "synthetic engine: divide every duration by this", "worker", _positive(float))
    heartbeat_interval: float = setting(2.0, "seconds between worker heartbeats", "worker", _positive(float))
    max_attempts: int = setting(
        3, "times a task may be started before it is failed as crashing its worker", "worker", _positive(int)
    )
    poll_interval: float = setting(0.01, "seconds between the idle worker's checks for new tasks", "worker", _positive(float))
    log_level: str = setting("info", "debug, info, warning or error")
    webhook_secret: str | None = setting(None, "signing secret of webhooks, whsec_ and base64 (Standard Webhooks); when "
                                         "absent one is generated once and kept in the queue", "api", _optional(str))
    webhook_allow_private: bool = setting(False, "let callback_url name loopback, private or link-local addresses "
                                          "(local development)", "api", _bool)
    fetch_image_urls: bool = setting(False, "let image_url (AceDataCloud) be an http(s) URL the server fetches; data: "
                                     "URLs are always taken", "api", _bool)
    fetch_allow_private: bool = setting(False, "let fetched image URLs name loopback, private or link-local addresses",
                                        "api", _bool)
    fetch_timeout: float = setting(10.0, "seconds a fetched image URL may take", "api", _positive(float))
    public_url: str | None = setting(None, "the server's URL as clients reach it (behind a proxy), for image links in "
                                     "answers and webhooks; default: the URL each request came to", "api",
                                     _optional(str))
    allowed_hosts: list[str] = setting(
        None, "host names the API answers to besides localhost, any IP address and --public-url's host (the Host "
        "header; others get 421, which stops DNS rebinding); * for any", "api", _list(str))
    cors_origins: list[str] = setting(
        None, "web page origins that may call the API from a browser (CORS) and post to it cross-site; default: "
        "pages on this machine (http://localhost, 127.0.0.1 and [::1] on any port, and null: a page opened from a "
        "file); * for any", "api", _list(str))
    link_ttl: float = setting(3600.0, "seconds the image links of OpenAI url and AceDataCloud answers stay valid; then "
                              "the task is removed", "api", _positive(float))
    sync_timeout: float = setting(600.0, "seconds a synchronous request (OpenAI Images, NebulaBlock, AceDataCloud "
                                  "without callback_url) waits for its images", "api", _positive(float))
    auth: str = setting("auto", "auto (an API key is needed once one exists) or required (needed even before)", "api")
    rate_limit: int | None = setting(600, "requests a minute each API key may make (every server process counts "
                                     "together); none for no limit", "api", _optional(_positive(int)))
    max_queued_per_key: int | None = setting(50, "unfinished tasks (waiting or running) each API key may have, a task "
                                             "asked with upscale counting its upscales too; none for no limit", "api",
                                             _optional(_positive(int)))
    scheduling: str = setting("auto", "fair (API keys take turns by GPU-seconds), fifo, or auto (fair once a key "
                              "exists)", "api")
    keep_finished: float = setting(24 * 3600.0, "seconds finished, failed and canceled tasks are kept, with their images",
                                   "api", _positive(float))
    unserved_timeout: float | None = setting(
        600.0, "seconds a waiting task may wait while workers run and none serves its model; then it fails saying so "
        "(none: it waits for such a worker forever)", "api", _optional(_positive(float)))
    max_store_bytes: int | None = setting(None, "disk bytes that images (and input images) take at most, counted in "
                                          "whole database pages; past it the oldest finished tasks go first", "api",
                                          _optional(_positive(int)))
    housekeeping_interval: float = setting(30.0, "seconds between retention sweeps (each server process runs them)",
                                           "api", _positive(float))
    print_webhook_secret: bool = setting(False, "print the webhook signing secret (generating it if needed) and exit",
                                         "api", _bool)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.lora_scales and len(self.lora_scales) != len(self.lora_paths or []):
            raise ValueError("lora_scales needs one scale per LoRA path")
        if not 0 <= self.synthetic_noise < 1:
            raise ValueError("synthetic_noise must be a fraction in [0, 1)")
        if self.webhook_secret is not None and not WEBHOOK_SECRET.fullmatch(self.webhook_secret):
            raise ValueError("webhook_secret must be whsec_ followed by base64 (at least 24 bytes), as Standard "
                             "Webhooks defines it")
        if self.scheduling not in ("auto", "fair", "fifo"):
            raise ValueError(f"scheduling must be auto, fair or fifo, got {self.scheduling!r}")
        if self.auth not in ("auto", "required"):
            raise ValueError(f"auth must be auto or required, got {self.auth!r}")
        if self.warm_up_size % 16:
            raise ValueError(f"warm_up_size must be a multiple of 16, got {self.warm_up_size}")
        if self.vae_decode not in VAE_DECODES:
            raise ValueError(f"vae_decode must be one of {', '.join(VAE_DECODES)}, got {self.vae_decode!r}")


def env_name(name: str) -> str:
    """The environment variable that sets a setting."""
    return ENV_PREFIX + name.upper()


def build_parser(role: str, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per setting this role reads."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in fields(Settings):
        if role not in f.metadata["roles"]:
            continue
        default = f.default if f.default is not None else "none"
        if isinstance(default, tuple):
            default = ",".join(f"{v:g}" for v in default)
        help_text = f"{f.metadata['help']} (env {env_name(f.name)}; default {default})"
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["parse"] is _bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const=True, default=argparse.SUPPRESS, type=_bool, help=help_text)
        elif f.name == "engine":
            parser.add_argument(flag, dest=f.name, choices=ENGINES, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, type=f.metadata["parse"], help=help_text)
    return parser


def load_settings(role: str, argv: Sequence[str] | None, prog: str, description: str) -> Settings:
    """Parse flags over environment over defaults."""
    parser = build_parser(role, prog, description)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        # Absent flags are absent from args (SUPPRESS), so "--quantize none" (None) still wins over the env.
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
            continue
        raw = os.environ.get(env_name(f.name))
        if raw is not None and raw != "":
            try:
                values[f.name] = f.metadata["parse"](raw)
            except (argparse.ArgumentTypeError, ValueError) as exc:
                parser.error(f"{env_name(f.name)}: {exc}")
    try:
        settings = Settings(**values)
    except ValueError as exc:
        parser.error(str(exc))
    if store.capabilities_of(settings.db).local_file:
        settings.db = str(Path(settings.db).expanduser())
    return settings
