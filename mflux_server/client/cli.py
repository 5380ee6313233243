"""The mflux-client command: generate with a progress line and write the files; status, list and cancel."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mflux_server.client import provenance
from mflux_server.client.errors import ServerError, TaskCanceled, TaskFailed
from mflux_server.client.sync import Client

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' as (width, height)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise argparse.ArgumentTypeError(f"size must look like 1024x768, got {text!r}")
    return int(width), int(height)


def parse_lora(text: str) -> dict[str, Any]:
    """'styles/ink' or 'styles/ink:0.8' as a loras entry (the scale defaults to 1)."""
    name, sep, scale = text.rpartition(":")
    if not sep:
        return {"name": text, "scale": 1.0}
    try:
        return {"name": name, "scale": float(scale)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"a LoRA is NAME or NAME:SCALE, e.g. styles/ink:0.8; got {text!r}") from None


def forecast_text(seconds: float, span: Any) -> str:
    """'~40 s, 30–55 s': the forecast and its range (four tasks in five finish inside it), where the server gave one."""
    text = f"~{seconds:.0f} s"
    if isinstance(span, list) and len(span) == 2 and f"{span[0]:.0f}" != f"{span[1]:.0f}":
        text += f", {span[0]:.0f}–{span[1]:.0f} s"
    return text


def progress_line(state: dict[str, Any]) -> str | None:
    """One line saying where a task is: queue position and forecast, or image, step and a bar; None for an event
    that changes none of it (a preview)."""
    if state.get("event") == "preview":
        return None
    status = state.get("status")
    if state.get("event") == "progress" and "step" in state:
        fraction = ((state["image"] - 1) * state["steps"] + state["step"]) / max(state["count"] * state["steps"], 1)
        bar = "#" * round(fraction * 20)
        return (f"image {state['image']}/{state['count']}  step {state['step']}/{state['steps']}  "
                f"[{bar:<20}] {fraction:4.0%}  {forecast_text(state.get('wait_remaining', 0), state.get('wait_range'))} left")
    if status == "waiting" or "position" in state or "pos" in state:
        position = state.get("position", state.get("pos", 0))
        seconds = state.get("wait_remaining", state.get("expected_time_seconds", 0))
        return f"queued: {position} ahead, {forecast_text(seconds, state.get('wait_range', state.get('expected_time_range')))}"
    return str(status or state.get("event", ""))


def unique_path(folder: Path, stem: str, extension: str) -> Path:
    """A file name that does not exist yet: the stem, then -1, -2, … (never overwrites)."""
    candidate = folder / f"{stem}.{extension}"
    number = 1
    while candidate.exists():
        candidate = folder / f"{stem}-{number}.{extension}"
        number += 1
    return candidate


def generate(client: Client, args: argparse.Namespace) -> int:
    """Submit, follow with a progress line on stderr, write every image, print their paths."""
    fields: dict[str, Any] = {"model": args.model, "steps": args.steps, "seed": args.seed, "count": args.count,
                              "format": args.format, "guidance": args.guidance, "negative_prompt": args.negative_prompt,
                              "image_strength": args.strength, "priority": args.priority or None,
                              "loras": args.lora, "control_strength": args.control_strength,
                              "control_preprocess": False if args.control_map else None}
    if args.size:
        fields["width"], fields["height"] = args.size
    if args.upscale is not None:
        fields["upscale"] = {"factor": args.upscale, **({"upscaler": args.upscaler} if args.upscaler else {})}
    live = sys.stderr.isatty()

    def show(state: dict[str, Any]) -> None:
        line = progress_line(state)
        if line is None:
            return
        if live:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
        elif state.get("event") in ("submitted", "done", "status"):
            print(line, file=sys.stderr)

    task = client.submit(args.prompt, image=args.image, mask=args.mask, control_image=args.control_image, **fields)
    show({"event": "submitted", **task})
    done = client.wait(task["task_id"], show)
    finals = client.final_images(done, show)  # the upscaled images, when --upscale asked for them
    if live:
        print(file=sys.stderr)
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for number, (task_id, index) in enumerate(finals):
        path = unique_path(folder, f"{stamp}-{done['seed'] + number}", EXTENSIONS[done["format"]])
        path.write_bytes(client.image(task_id, index))
        print(path)
    return 0


def cancel(client: Client, task_id: str) -> str:
    """Cancel or delete a task; the sentence says which, and what the task was."""
    before = client.status(task_id).get("status")
    result = client.cancel(task_id).get("result")
    if result == "canceled":
        return f"canceled {task_id} (it was {before})"
    if before == "canceled":
        return f"{task_id} was already canceled; removed it from the server"
    return f"deleted {task_id} (it had ended: {before})"


def list_lines(tasks: list[dict[str, Any]]) -> list[str]:
    """The task table: a header, one row per task (a prompt's line breaks shown as spaces), or a sentence."""
    if not tasks:
        return ["no tasks"]
    lines = [f"{'TASK':<32}  {'STATUS':<10} {'MODEL':<12} PROMPT"]
    for task in tasks:
        prompt = " ".join(str(task.get("prompt", "")).split())
        lines.append(f"{task['task_id']:<32}  {task['status']:<10} {task['model']:<12} {prompt[:60]}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one command; exit 1 with the server's message on an error."""
    default_server = os.environ.get("MFLUX_SERVER_URL", "http://127.0.0.1:4030")
    server_help = "the server's base URL (default $MFLUX_SERVER_URL or http://127.0.0.1:4030)"
    # --server is taken before or after the command: each command's parser knows it too (its default left out,
    # so that one given before the command is not overwritten).
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--server", default=argparse.SUPPRESS, help=server_help)
    parser = argparse.ArgumentParser(prog="mflux-client", description="Talk to an mflux-server.")
    parser.add_argument("--server", default=default_server, help=server_help)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate images and write them to a folder", parents=[after])
    gen.add_argument("prompt")
    gen.add_argument("-n", "--count", type=int, default=1)
    gen.add_argument("-o", "--output", default=".", help="folder for the images (default: here)")
    gen.add_argument("--model")
    gen.add_argument("--size", type=parse_size, help="WIDTHxHEIGHT, e.g. 1024x768")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--format", default="PNG", choices=sorted(EXTENSIONS))
    gen.add_argument("--image", help="init or reference image file")
    gen.add_argument("--strength", type=float, help="image-to-image strength, 0 to 1")
    gen.add_argument("--mask", help="inpaint mask file (white repaints)")
    gen.add_argument("--priority", action="store_true")
    gen.add_argument("--lora", action="append", type=parse_lora, metavar="NAME[:SCALE]",
                     help="a LoRA from the server's library (GET /api/loras), repeatable; scale 1 unless given")
    gen.add_argument("--control-image", help="ControlNet or depth models: the image whose edges or depth guide the layout")
    gen.add_argument("--control-strength", type=float, help="how strongly the control map steers, 0 to 2")
    gen.add_argument("--control-map", action="store_true",
                     help="the control image is the map already (a depth map), not a photo to turn into one")
    gen.add_argument("--upscale", type=float, metavar="FACTOR",
                     help="then upscale each image by FACTOR (above 1, at most 4) and write the upscaled images")
    gen.add_argument("--upscaler", help="with --upscale: the upscaler (GET /api/models); default: the server's first")
    for name, helptext in (("status", "a task's status"), ("cancel", "cancel or delete a task")):
        commands.add_parser(name, help=helptext, parents=[after]).add_argument("task_id")
    listing = commands.add_parser("list", help="the queue and recent tasks", parents=[after])
    listing.add_argument("--status")
    listing.add_argument("--limit", type=int, default=20)
    inspect = commands.add_parser("inspect", help="what an image file says about what made it (no server needed)")
    inspect.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        print(json.dumps(provenance.read(Path(args.file).read_bytes()), indent=1, ensure_ascii=False))
        return 0
    client = Client(args.server)
    try:
        if args.command == "generate":
            return generate(client, args)
        if args.command == "status":
            print(json.dumps(client.status(args.task_id), indent=1))
        elif args.command == "cancel":
            print(cancel(client, args.task_id))
        else:
            print("\n".join(list_lines(client.list(args.status, args.limit)["tasks"])))
    except (ServerError, TaskFailed, TaskCanceled) as error:
        print(f"mflux-client: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"mflux-client: cannot reach {args.server}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
