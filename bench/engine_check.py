"""make engine-check: every served family through the real worker and API with mflux's networks on random weights.

Full depth where MLX has a GPU, one block of each kind on the CPU backend (bench/random_weights.py says why).
Per family it records the load with its warm-up, seconds per step at each size, the VAE decode path, peak
memory, previews, cancel of a running task, and what a request larger than the worker runs gets; then writes
docs/engine-check.md. `python -m bench.engine_check --help` lists the knobs.
"""

from __future__ import annotations

import argparse
import base64
import io
import math
import os
import platform
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from PIL import Image

from bench.random_weights import fast_blas_preload
from mflux_server import store
from mflux_server.core import catalog
from mflux_server.testing import ROOT, Processes, fresh_queue, read_events, wait_for

OUT = ROOT / "docs" / "engine-check.md"
CUT = "one block of each kind (CPU); text encoders keep their depth on one block's weights"


@dataclass
class Size:
    """One size's generation: wall time, the worker's measured step time, previews seen, peak memory."""

    side: int
    outcome: str
    seconds: float = math.nan
    step_seconds: float = math.nan
    previews: int = 0
    peak_gib: float = math.nan


@dataclass
class FamilyResult:
    """What one family did in the check."""

    family: str
    model: str
    load_seconds: float = math.nan
    decode_path: str = "–"
    sizes: list[Size] = field(default_factory=list)
    cancel: str = "–"
    oversize: str = "–"
    error: str = ""


def representative(family: str) -> catalog.ModelInfo:
    """The family's first model in the catalog."""
    return next(info for info in catalog.models() if info.family == family)


def png_b64(size: tuple[int, int], colour: str = "grey", mode: str = "RGB") -> str:
    """A plain picture as base64 PNG, for the families that need an input image or a mask."""
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def body_for(info: catalog.ModelInfo, side: int, steps: int, prompt: str) -> dict[str, Any]:
    """A request the model accepts: text, or an edit of a grey picture, or an inpaint of its middle."""
    body: dict[str, Any] = {"prompt": prompt, "model": info.name, "width": side, "height": side, "steps": steps,
                            "format": "PNG", "seed": 1}
    if info.needs_image:
        body["image"] = png_b64((side, side))
        if info.capabilities.inpaint and not info.capabilities.edit:
            body["mask"] = png_b64((side, side), "white", "L")
    return body


def peak_after(log: str, side: int, start: int) -> float:
    """The peak memory the engine logged for the first side×side generation after position `start` of the log."""
    found = re.compile(rf" {side}×{side}: peak memory ([0-9.]+) GiB").search(log, start)
    return float(found.group(1)) if found else math.nan


def run_size(url: str, procs: Processes, proc: Any, info: catalog.ModelInfo, side: int, steps: int,
             timeout: float) -> Size:
    """Generate one image at side² and follow its event stream to the end."""
    mark = len(procs.log(proc))
    started = time.perf_counter()
    answer = requests.post(f"{url}/api/generate", json=body_for(info, side, steps, "engine check"), timeout=60)
    if answer.status_code != 200:
        return Size(side, f"refused {answer.status_code}: {answer.json().get('message', '')[:120]}")
    task_id = answer.json()["task_id"]
    with requests.get(f"{url}/api/tasks/{task_id}/events", stream=True, timeout=timeout) as response:
        events = list(read_events(response))
    seconds = time.perf_counter() - started
    last = events[-1] if events else {"event": "none", "data": {}}
    previews = sum(1 for event in events if event["event"] == "preview")
    outcome = "done" if last["event"] == "done" else f"{last['event']}: {str(last['data'].get('error', ''))[:120]}"
    return Size(side, outcome, seconds, previews=previews, peak_gib=peak_after(procs.log(proc), side, mark))


def step_seconds(db_path: str, model: str) -> dict[int, float]:
    """Mean seconds per denoising step at each square size, from the timings the worker recorded."""
    db = store.connect(db_path)
    try:
        return {s.width: s.total / s.n for s in db.timing_stats()
                if s.model == model and s.kind == "step" and s.width == s.height and s.n}
    finally:
        db.close()


def cancel_check(url: str, procs: Processes, proc: Any, info: catalog.ModelInfo, side: int) -> str:
    """Cancel a running task after its first step; how long until the worker said it stopped at a step."""
    task_id = requests.post(f"{url}/api/generate", json=body_for(info, side, 50, "to be canceled"),
                            timeout=60).json()["task_id"]
    seen: list[dict[str, Any]] = []

    def follow() -> None:
        with requests.get(f"{url}/api/tasks/{task_id}/events", stream=True, timeout=900) as response:
            seen.extend(read_events(response))

    listener = threading.Thread(target=follow, daemon=True)
    listener.start()
    wait_for(lambda: any(e["event"] == "progress" and e["data"].get("step") for e in seen), timeout=900,
             interval=0.05, what="the task running")
    asked = time.perf_counter()
    requests.delete(f"{url}/api/tasks/{task_id}", timeout=30)
    wait_for(lambda: f"task {task_id}: canceled" in procs.log(proc), timeout=900, interval=0.01,
             what="the worker stopping the canceled task")
    stopped = time.perf_counter() - asked
    listener.join(timeout=900)
    status = requests.get(f"{url}/api/status", params={"task_id": task_id}, timeout=30).json()["status"]
    steps = [e["data"]["step"] for e in seen if e["event"] == "progress" and "step" in e["data"]]
    return f"{status}; the worker stopped {stopped:.2f} s after DELETE, {max(steps)} of 50 steps shown"


def oversize_check(url: str, info: catalog.ModelInfo) -> str:
    """What a request one notch above the largest image the serving worker runs gets."""
    side = largest_side(url, info.name) + 16
    answer = requests.post(f"{url}/api/generate", json=body_for(info, side, 1, "too large"), timeout=60)
    return f"{side}² → {answer.status_code} {answer.json().get('message', '')[:140]}"


def largest_side(url: str, model: str) -> int:
    """The largest square side (a multiple of 16) the serving worker runs for this model."""
    models = {m["name"]: m for m in requests.get(f"{url}/api/models", timeout=30).json()["models"]}
    limit = min((w["max_pixels"] for w in models[model]["workers"]), default=0)
    return math.isqrt(limit) // 16 * 16


def check(info: catalog.ModelInfo, sides: list[int], steps: int, depth: int | None, timeout: float,
          largest: bool = False) -> FamilyResult:
    """Run one family's model through a fresh API and worker."""
    result = FamilyResult(info.family, info.name)
    env = {"MFLUX_RANDOM_DEPTH": str(depth or ""), "MFLUX_RANDOM_SHARE": "1"} | fast_blas_preload()
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        with fresh_queue() as procs:
            url = procs.server()
            proc = procs.spawn("bench.random_weights_worker", [
                "--engine", "mflux", "--model", info.name, "--warm-up-size", str(min(sides)), "--warm-up-steps", "1",
                "--heartbeat-interval", "1", "--stale-after", str(int(timeout))], f"worker-{info.name}")
            wait_for(lambda: procs.worker_count() > 0 or proc.poll() is not None, timeout=timeout, interval=0.5,
                     what=f"{info.name} loaded")
            log = procs.log(proc)
            if proc.poll() is not None:
                result.error = (log.strip().splitlines() or ["exited"])[-1][-300:]
                return result
            loaded = re.search(r"VAE decode path for \S+: (\w+)", log)
            result.decode_path = loaded.group(1) if loaded else "mflux's own (no choice)"
            db = store.connect(procs.db_path)
            result.load_seconds = db.load_stats()[info.name].last
            db.close()
            if largest and largest_side(url, info.name) not in sides:
                sides = [*sides, largest_side(url, info.name)]
            for side in sides:
                result.sizes.append(run_size(url, procs, proc, info, side, steps, timeout))
            result.cancel = cancel_check(url, procs, proc, info, min(sides))
            result.oversize = oversize_check(url, info)
            done = {size.side for size in result.sizes if size.outcome == "done"}
            # The publisher writes timings in batches: wait until every finished size has some.
            measured = wait_for(lambda: (m := step_seconds(procs.db_path, info.name)).keys() >= done and m,
                                timeout=30, what="the step timings") if done else {}
            for size in result.sizes:
                size.step_seconds = measured.get(size.side, math.nan)
    except Exception as exc:  # one family's failure is a result, not the end of the check
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return result


def render(results: list[FamilyResult], depth: int | None, steps: int, command: str) -> str:
    """docs/engine-check.md."""
    import mlx.core as mx

    where = f"{platform.node()}, {platform.machine()}, MLX {mx.__version__} on {mx.default_device()}"
    blas = fast_blas_preload().get("LD_PRELOAD", "MLX's bundled BLAS")
    lines = [
        "# Engine check: every served family through the real worker, mflux's networks on random weights", "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} ({where}; BLAS: {blas}).",
        f"Networks: {CUT if depth else 'full depth'}, random weights; {steps} steps per "
        "image. Load includes the warm-up. Step time is the worker's own measurement (mean); wall time is submit "
        "to the done event. Peak memory is MLX's, as the engine logs it per generation.", "",
        "| family | model | load s | decode path | size | outcome | wall s | s/step | previews | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.family} | `{r.model}` | – | – | – | **failed:** {r.error} | | | | |")
            continue
        for n, s in enumerate(r.sizes):
            head = f"| {r.family} | `{r.model}` | {r.load_seconds:.1f} | {r.decode_path}" if n == 0 else "| | | |"
            lines.append(f"{head} | {s.side}² | {s.outcome} | {s.seconds:.2f} | {s.step_seconds:.3f} | {s.previews} | "
                         f"{s.peak_gib:.2f} |")
    lines += ["", "## Cancel and oversized requests", "", "| model | cancel of a running 50-step task | "
              "a request above the worker's largest image |", "|---|---|---|"]
    lines += [f"| `{r.model}` | {r.cancel} | {r.oversize} |" for r in results if not r.error]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Check the families asked for (all by default) and write the report."""
    import mlx.core as mx

    gpu = mx.default_device() != mx.cpu
    parser = argparse.ArgumentParser(prog="python -m bench.engine_check", description=__doc__)
    parser.add_argument("--families", help="comma-separated family names (default: every served family)")
    parser.add_argument("--sizes", help="comma-separated square sides (default: 512,1024 on a GPU, 128,256 on CPU)")
    parser.add_argument("--steps", type=int, default=4 if gpu else 2)
    parser.add_argument("--depth", type=int, default=0 if gpu else 1, help="blocks of each kind; 0 is full depth")
    parser.add_argument("--largest", action=argparse.BooleanOptionalAction, default=gpu,
                        help="also the largest image the worker runs for the model (default on a GPU)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one load or one image may take")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    families = args.families.split(",") if args.families else list(dict.fromkeys(i.family for i in catalog.models()))
    sides = [int(s) for s in args.sizes.split(",")] if args.sizes else ([512, 1024] if gpu else [128, 256])
    results = []
    for family in families:
        info = representative(family)
        started = time.perf_counter()
        results.append(check(info, sides, args.steps, args.depth or None, args.timeout, args.largest))
        print(f"{family}: {results[-1].error or 'ok'} ({time.perf_counter() - started:.0f} s)", flush=True)
        args.out.write_text(render(results, args.depth or None, args.steps, "make engine-check"))
    print(f"wrote {args.out}")
    return 0 if not any(r.error for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
