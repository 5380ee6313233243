"""The submit service every surface calls: the checks a request must pass, in cheapest-first order, and the one
write that queues it (with an Idempotency-Key, once)."""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import replace
from typing import Any, NoReturn

import marshmallow as ma
from flask import g, request

from mflux_server.api.auth import by_cookie, current_key
from mflux_server.api.context import db, forecaster, lora_library, settings, writes
from mflux_server.api.errors import abort_json
from mflux_server.api.generation_schemas import MAX_SEED, MIN_SIZE
from mflux_server.api.image_inputs import RawImage, verified
from mflux_server.api.task_view import live_workers
from mflux_server.core import catalog, structured_prompts
from mflux_server.core.lora_library import hub_reference
from mflux_server.core.rows import (
    CONTROL_ROLE,
    REFERENCE_ROLES,
    ApiKey,
    ControlSettings,
    InputImage,
    LoraSet,
    NewTask,
    Task,
    UpscaleAfter,
    Worker,
    lora_set_text,
)

# mflux's default image-to-image strength (mflux.cli.defaults.IMAGE_STRENGTH).
DEFAULT_IMAGE_STRENGTH = 0.4
log = logging.getLogger("mflux_server")


def body_limit() -> int:
    """The largest generate body: every input image at --max-input-bytes, base64-encoded, plus 1 MiB for the rest."""
    images = 1 + len(REFERENCE_ROLES) + 3  # the image, further references, the mask, the control and garment images
    return (1 << 20) + images * (settings().max_input_bytes * 4 // 3 + 4)


def require_json_body() -> None:
    """A POST must carry JSON or a multipart upload; without this a form post would read as 'prompt missing'."""
    if request.method == "POST":
        check_body()


def check_body() -> None:
    """Refuse a body that is neither JSON nor multipart (415) or is over the limit (413), before it is read."""
    if not (request.is_json or request.mimetype == "multipart/form-data"):
        abort_json(415, message="send the request body as JSON (Content-Type: application/json) or as "
                                "multipart/form-data")
    limit = body_limit()
    if request.content_length is None:
        # A chunked body has no length to check up front, and werkzeug cuts one at the limit without a word
        # (which then reads as broken JSON): read one byte past the limit and refuse what reaches it.
        request.max_content_length = limit + 1
        if len(request.get_data(cache=True)) > limit:
            abort_json(413, message=f"the request body is over {limit} bytes (the chunked body was refused)")
    # Input images make generate bodies larger than the app-wide 1 MiB; the body is not read yet.
    request.max_content_length = request.max_form_memory_size = limit


def default_model() -> str:
    """The model a request that names none gets: the one POST /api/load chose last, else --model."""
    return db().server_setting("default_model") or settings().model


def served_models(live: list[Worker]) -> set[str]:
    """Models some live worker may serve (loaded or switchable)."""
    return {name for w in live for name in w.servable}


def _reject(field: str, rule: str, within: str | None = None) -> NoReturn:
    location = "form" if request.mimetype == "multipart/form-data" else "json"
    named: dict[str, Any] = {field: [rule]}
    abort_json(422, errors={location: {within: named} if within else named})


def upscalers() -> list[str]:
    """The catalog's upscalers, by registry name."""
    return [info.name for info in catalog.models() if info.capabilities.upscale]


def default_upscaler() -> str:
    """The upscaler a request that names none gets: the first in the catalog."""
    return upscalers()[0]


def upscale_after(asked: dict[str, Any], width: int, height: int, live: list[Worker], served: set[str]) -> UpscaleAfter:
    """A generate request's `upscale` checked as POST /api/upscale checks its own fields (a 422 names
    upscale.<field>; a 409 when no live worker serves the upscaler), for images of width × height."""
    if asked["factor"] is not None and (asked["width"] is not None or asked["height"] is not None):
        _reject("factor", "give a factor, or a target width and height, not both", "upscale")
    name = asked["upscaler"] or default_upscaler()
    resolved = catalog.resolve_reference(name)
    if resolved is None or not resolved.info.capabilities.upscale:
        _reject("upscaler", f"{name!r} is not an upscaler; the upscalers are {', '.join(upscalers())}", "upscale")
    if live and resolved.served not in served:
        abort_json(409, code="model_not_served", field="upscale.upscaler",
                   message=f"no live worker serves the upscaler {resolved.served}; the live workers serve "
                           f"{', '.join(sorted(served))}. The task was not queued")
    factor = asked["factor"] if asked["factor"] is not None or asked["width"] or asked["height"] else 2.0
    target = {"width": asked["width"], "height": asked["height"], "upscale_factor": factor}
    wide, high, field = upscale_size(target, InputImage("image", "", width, height, b""), "upscale")
    limit = pixel_limit(live, resolved.served)
    if limit is not None and wide * high > limit:
        _reject(field, f"the target {wide}×{high} = {wide * high} pixels; the workers serving {resolved.served} run "
                       f"at most {limit} pixels", "upscale")
    return UpscaleAfter(resolved.served, wide, high, asked["steps"] or resolved.info.default_steps,
                        resolved.info.default_guidance)


def check_inputs(body: dict[str, Any], info: catalog.ModelInfo, served: str) -> tuple[InputImage, ...]:
    """Refuse what the model cannot use, naming the field and the model; then decode and verify the images (off
    the event loop, after every cheap rule) and return them with their roles."""
    can = info.capabilities
    given = [name for name in ("image", "init_image", "images") if body[name] is not None]
    if len(given) > 1:
        _reject(given[1], f"send one of image, init_image (the original server's name for it) or images, not both "
                          f"{given[0]} and {given[1]}")
    image_field = given[0] if given else "image"
    references: list[RawImage] = list(body["images"] or [])
    image = body[image_field] if image_field != "images" else references.pop(0)
    mask = body["mask"]
    if references:
        _check_references(body, info, served, len(references) + 1)
    takes_image = can.image_to_image or can.edit or can.inpaint or can.upscale or can.variation
    if image is not None and not takes_image:
        _reject(image_field, f"model {served} takes no input image: " +
                ("it is guided by control_image" if can.control else "it is text-to-image only"))
    if image is None and info.needs_image:
        _reject("image", f"model {served} needs an input image: it " +
                ("edits a reference image" if can.edit else "draws variations of image or images" if can.variation
                 else "repaints an image under a mask"))
    strengths = body.get("image_strengths")
    if strengths is not None and not can.variation:
        _reject("image_strengths", f"model {served} draws no variations (capabilities.variation)")
    if strengths is not None and len(strengths) != len(references) + (image is not None):
        _reject("image_strengths", f"give one strength per image: {len(references) + (image is not None)} "
                                   f"image(s), {len(strengths)} strength(s)")
    if body["image_strength"] is not None and not can.image_to_image:
        _reject("image_strength", f"model {served} does no image-to-image, so image_strength does not apply")
    if body["image_strength"] is not None and image is None:
        _reject("image_strength", "needs an input image (image)")
    if mask is not None and not can.inpaint:
        _reject("mask", f"model {served} does no inpainting, so it cannot use a mask")
    if mask is not None and image is None:
        _reject("mask", "needs the image it masks (image)")
    if mask is None and can.inpaint and not can.edit and not can.text_to_image:
        _reject("mask", f"model {served} inpaints: send the mask (white = repaint) with the image")
    garment = body.get("garment_image")
    if garment is not None and not can.try_on:
        _reject("garment_image", f"model {served} does no try-on (capabilities.try_on)")
    if garment is None and can.try_on:
        _reject("garment_image", f"model {served} dresses a person: send garment_image (the garment) with image (the "
                                 "person) and mask (white where the garment goes)")
    if body["negative_prompt"] and not can.negative_prompt:
        _reject("negative_prompt", f"model {served} ignores negative prompts")
    prompt_problem = structured_prompts.problem(info.family, body["prompt"])
    if prompt_problem:
        _reject("prompt", f"model {served}: {prompt_problem}")
    inputs = []
    if image is not None:
        inputs.append(replace(_verified(image, image_field if image_field != "images" else "images.0"), role="image"))
    # _check_references capped the list, so every reference gets a role (the roles may outnumber them).
    for number, (role, reference) in enumerate(zip(REFERENCE_ROLES, references, strict=False), start=1):
        inputs.append(replace(_verified(reference, f"images.{number}"), role=role))
    if mask is not None:
        checked = _verified(mask, "mask", role="mask")
        if (checked.width, checked.height) != (inputs[0].width, inputs[0].height):
            _reject("mask", f"must be the image's size, {inputs[0].width}×{inputs[0].height}; got "
                            f"{checked.width}×{checked.height}")
        inputs.append(replace(checked, role="mask"))
    if garment is not None:  # stored as the first further reference: a try-on takes no other
        inputs.append(replace(_verified(garment, "garment_image"), role=REFERENCE_ROLES[0]))
    return tuple(inputs)


def control_rules(body: dict[str, Any], info: catalog.ModelInfo, served: str) -> ControlSettings | None:
    """The request's control settings, checked against the model before any image is decoded (a 422 names the
    field); None for a request without control_image."""
    given = body.get("control_image") is not None
    control = info.control if info.capabilities.control else None
    if not given:
        if control is not None:
            _reject("control_image", f"model {served} is guided by a control image ({', '.join(control.types)}): "
                                     "send control_image")
        for field in ("control_type", "control_strength", "control_preprocess"):
            if body.get(field) is not None:
                _reject(field, "needs control_image, on a model with the control capability")
        return None
    if control is None:
        _reject("control_image", f"model {served} takes no control image (GET /api/models: capabilities.control); "
                                 "the ControlNet and depth models do")
    kind = body.get("control_type") or control.types[0]
    if kind not in control.types:
        _reject("control_type", f"model {served} takes {', '.join(control.types)} control, not {kind}")
    strength = body.get("control_strength")
    if strength is not None and control.default_strength is None:
        _reject("control_strength", f"model {served} takes no control strength")
    preprocess = body.get("control_preprocess")
    if preprocess is False and not control.maps:
        _reject("control_preprocess", f"model {served} always turns control_image into its {kind} map itself "
                                      "(mflux), so send a photo and leave control_preprocess true")
    return ControlSettings(kind, control.default_strength if strength is None else float(strength), preprocess is not False)


def check_loras(entries: list[dict[str, Any]] | None, info: catalog.ModelInfo, served: str) -> LoraSet:
    """The request's LoRAs, each found in the library and fitting the model's family; a 422 names the entry."""
    if not entries:
        return ()
    if not info.capabilities.loras:
        _reject("loras", f"model {served} takes no LoRAs (GET /api/models: capabilities.loras)")
    library, hub = lora_library(), settings().lora_hub
    if library.folder is None and not hub:
        _reject("loras", "this server has no LoRA library (it runs without --lora-dir or --lora-hub)")
    seen: set[str] = set()
    for number, entry in enumerate(entries):
        name, field = entry["name"], f"loras.{number}.name"
        if name in seen:
            _reject(field, f"{name!r} is named twice; give it once, with its scale")
        seen.add(name)
        found = library.get(name)
        if found is None and hub and hub_reference(name):
            continue  # a Hugging Face reference: its file is the worker's to fetch, and its fit mflux's to check
        if found is None:
            hint = " (Hugging Face references need --lora-hub)" if hub_reference(name) and not hub else ""
            _reject(field, f"no LoRA named {name!r} in the library; GET /api/loras lists them{hint}")
        if info.family not in found.families:
            fits = ", ".join(found.families) or "no model family mflux knows"
            _reject(field, f"{name!r} fits {fits}, not {served} (family {info.family})")
    return tuple((entry["name"], float(entry["scale"])) for entry in entries)


def _verified(raw: RawImage, field: str, role: str = "image") -> InputImage:
    """Decode and verify one input image on the decode pool; a bad one is a 422 naming its field."""
    try:
        return verified(raw, role)
    except ma.ValidationError as error:
        _reject(field, str(error.messages[0] if isinstance(error.messages, list) else error.messages))


def _check_references(body: dict[str, Any], info: catalog.ModelInfo, served: str, count: int) -> None:
    """Several images are the references of one edit: only models that edit from several take them."""
    can = info.capabilities
    if not can.edit and not can.variation:
        _reject("images", f"model {served} does no edit, so it takes one input image, not {count}")
    if count > info.max_reference_images:
        what = "takes at most {} image prompt(s)" if can.variation else "edits from at most {} reference image(s)"
        _reject("images", f"model {served} {what.format(info.max_reference_images)}; got {count}")
    if body["image_strength"] is not None:
        _reject("image_strength", "applies to one start image (image-to-image), not to several edit references")
    if body["mask"] is not None:
        _reject("mask", "masks one image (inpaint), not several edit references")


def output_size(body: dict[str, Any], image: InputImage | None) -> tuple[int, int]:
    """The requested size; without one, the input image's (to a multiple of 16, within limits), else 1024²."""
    width, height = body["width"], body["height"]
    if image is None:
        return width or 1024, height or 1024
    step = catalog.size_multiple()
    scale = min(1.0, settings().max_width / image.width, settings().max_height / image.height)
    natural = (max(MIN_SIZE, int(image.width * scale) // step * step), max(MIN_SIZE, int(image.height * scale) // step * step))
    return width or natural[0], height or natural[1]


def upscale_size(body: dict[str, Any], image: InputImage, within: str | None = None) -> tuple[int, int, str]:
    """An upscale's target size (from its factor, or its width and height with the image's aspect), and the field
    that set it; a 422 names that field when the target is over the server's limits or not larger."""
    step, (w, h) = catalog.size_multiple(), (image.width, image.height)
    if body["width"] or body["height"]:
        field = "width" if body["width"] else "height"
        width = body["width"] or max(MIN_SIZE, round(w * body["height"] / h / step) * step)
        height = body["height"] or max(MIN_SIZE, round(h * body["width"] / w / step) * step)
    else:
        field, factor = "factor", body["upscale_factor"]
        width, height = int(w * factor) // step * step, int(h * factor) // step * step
    most = (settings().max_width, settings().max_height)
    if width > most[0] or height > most[1]:
        _reject(field, f"the target {width}×{height} is over the server's largest image, {most[0]}×{most[1]} "
                       f"(--max-width, --max-height); the image is {w}×{h}", within)
    if width * height <= w * h or min(width, height) < MIN_SIZE:
        _reject(field, f"the target {width}×{height} is not larger than the image, {w}×{h}", within)
    return width, height, field


def pixel_limit(live: list[Worker], served: str) -> int | None:
    """The largest image any live worker serving this model can run, when they say."""
    limits = [limit for w in live if served in w.servable and (limit := w.limit_for(served)) is not None]
    return max(limits) if limits else None


def queue_task(body: dict[str, Any], surface: str = "native", keep_for: float | None = None,
               client_user: str | None = None) -> tuple[Task, list[Worker]]:
    """Check a loaded generate body against the catalog and the live workers and queue it; every surface's
    requests become tasks here. Returns the task and the live workers read for it."""
    if by_cookie():  # NebulaBlock's GET generation: the cookie a cross-site page can send must not submit
        abort_json(403, code="cookie_cannot_submit", field="Authorization",
                   message="the web UI's cookie only reads; send Authorization: Bearer <key> to submit a task")
    key = current_key()
    if body["priority"] and key is not None and not (key.admin or key.priority):
        abort_json(403, code="priority_not_allowed", field="priority",
                   message=f"priority: the key {key.name!r} may not submit priority tasks (keys create --priority)")
    check_key_quota(key, body)
    resolved = catalog.resolve_reference(body["model"] or default_model())
    live = live_workers(db())  # read once: it decides the model check and the forecast's worker count
    served = served_models(live)
    if resolved is None:
        _reject("model", f"the server's default model {default_model()!r} is not in the catalog; name a model")
    if live and resolved.served not in served:
        # With no worker alive the task queues (and says waiting_for_worker); with workers that cannot run it, it
        # would wait forever, so say so now.
        abort_json(409, code="model_not_served", field="model",
                   message=f"no live worker serves {resolved.served}; the live workers serve {', '.join(sorted(served))}. "
                           "The task was not queued")
    info = resolved.info
    upscaling = "upscale_factor" in body  # POST /api/upscale
    if info.capabilities.upscale and not upscaling:
        _reject("model", f"model {resolved.served} is an upscaler: send the picture to POST /api/upscale")
    loras = check_loras(body.get("loras"), info, resolved.served)
    control = control_rules(body, info, resolved.served)
    inputs = check_inputs(body, info, resolved.served)
    if control is not None:  # decoded after every cheap rule, as the other inputs
        inputs += (replace(_verified(body["control_image"], "control_image"), role=CONTROL_ROLE),)
    if upscaling:
        width, height, size_field = upscale_size(body, inputs[0])
    else:
        width, height = output_size(body, inputs[0] if inputs else None)
        size_field = "width" if body["width"] else "height"
    limit = pixel_limit(live, resolved.served)
    if limit is not None and width * height > limit:
        _reject(size_field,
                f"width × height = {width}×{height} = {width * height} pixels; the workers serving {resolved.served} "
                f"run at most {limit} pixels")
    after = upscale_after(body["upscale"], width, height, live, served) if body.get("upscale") else None
    seed = body["seed"]
    if seed is None:
        seed = secrets.randbelow(MAX_SEED - body["count"] + 2)
    elif seed + body["count"] - 1 > MAX_SEED:
        _reject("seed", f"seed + count - 1 must be at most {MAX_SEED}")
    image_strength = body["image_strength"]
    if inputs and image_strength is None and info.capabilities.image_to_image and not info.capabilities.edit:
        image_strength = DEFAULT_IMAGE_STRENGTH
    guidance = body["guidance"] if body["guidance"] is not None else info.default_guidance
    task = NewTask(prompt=body["prompt"], model=resolved.served, width=width, height=height,
                   steps=body["steps"] or info.default_steps, guidance=0.0 if guidance is None else guidance, seed=seed,
                   count=body["count"], format=body["format"], quality=body["quality"], priority=int(body["priority"]),
                   negative_prompt=body["negative_prompt"] or None, image_strength=image_strength,
                   guidance_auto=guidance is None, inputs=inputs, surface=surface,
                   callback_url=body.get("callback_url"), link_base=settings().public_url or request.host_url, keep_for=keep_for,
                   client_user=client_user, key_id=key.id if key else None, loras=lora_set_text(loras),
                   control=control.text() if control else "",
                   image_strengths=json.dumps(body["image_strengths"]) if body.get("image_strengths") else "",
                   private=bool(body.get("private")) or not settings().metadata_prompts,
                   then_upscale=after.text() if after else "")
    if fair_scheduling():
        cost = forecaster().cost_model(db())
        task = replace(task, fair_cost=cost.gpu_seconds(task))
        if after is not None:  # each upscale is charged to the key too, at the upscaler's price
            upscale = replace(task, model=after.model, width=after.width, height=after.height, steps=after.steps, count=1)
            task = replace(task, then_upscale=after._replace(fair_cost=cost.gpu_seconds(upscale)).text())
    created = submit_once(task, key.id if key else 0)
    g.committed_task_id = created.id  # from here a storage fault must not say the request was not carried out
    return created, live


def check_key_quota(key: ApiKey | None, body: dict[str, Any]) -> None:
    """429 when the key's unfinished tasks, with the upscales they will queue, leave no room for this task and its
    own upscales (--max-queued-per-key); 422 on `count` when this task alone is more than the key may have."""
    limit = settings().max_queued_per_key
    if key is None or limit is None:
        return
    weight = 1 + (body["count"] if body.get("upscale") else 0)
    if weight > limit:
        _reject("count", f"with upscale, a task counts as 1 + count tasks (it queues an upscale per image), "
                         f"and the key {key.name!r} may have at most {limit} unfinished (--max-queued-per-key)")
    if db().unfinished_of_key(key.id) + weight > limit:
        abort_json(429, code="too_many_requests", field=None, headers={"Retry-After": "10"},
                   message=f"the key {key.name!r} has {limit} unfinished tasks, the most it may have, counting the "
                           "upscales its waiting tasks will queue (--max-queued-per-key); submit again when one has "
                           "finished")


def fair_scheduling() -> bool:
    """Whether keys take turns (--scheduling fair, or auto once a key exists) rather than first in, first out."""
    mode = settings().scheduling
    return mode == "fair" or (mode == "auto" and db().keys_exist())


IDEMPOTENCY_WINDOW = 24 * 3600.0  # seconds an Idempotency-Key keeps answering its task
MAX_IDEMPOTENCY_KEY = 255


def request_fingerprint() -> str:
    """What makes two submits the same: method, path, and the body (for multipart, its fields and file contents,
    since every client picks a new boundary per request)."""
    digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    if request.mimetype == "multipart/form-data":
        for name, value in sorted(request.form.items(multi=True)):
            digest.update(f"{name}={value}\n".encode("utf-8", "surrogatepass"))
        for name, upload in sorted(request.files.items(multi=True), key=lambda item: item[0]):
            digest.update(f"{name}:".encode() + hashlib.sha256(upload.stream.read()).digest())
            upload.stream.seek(0)
    else:
        digest.update(request.get_data(cache=True))
    return digest.hexdigest()


def submit_once(task: NewTask, key_id: int) -> Task:
    """Queue the task; with an Idempotency-Key header, a retry of the same request answers the task it created."""
    idem_key = request.headers.get("Idempotency-Key")
    size = sum(len(image.data) for image in task.inputs)
    if idem_key is None:
        return writes(lambda session: session.submit(task), size)
    if not 1 <= len(idem_key) <= MAX_IDEMPOTENCY_KEY or not idem_key.isprintable() or not idem_key.isascii():
        abort_json(422, field="Idempotency-Key", message=f"Idempotency-Key: must be 1 to {MAX_IDEMPOTENCY_KEY} "
                                                         "printable ASCII characters")
    fingerprint = request_fingerprint()  # read here: an OS thread has no request
    created, other = writes(lambda session: session.submit_idempotent(task, key_id, idem_key, fingerprint,
                                                                      IDEMPOTENCY_WINDOW), size)
    if other is not None:
        abort_json(422, code="idempotency_key_reused", field="Idempotency-Key",
                   message=f"Idempotency-Key: {idem_key!r} was used within 24 h for another request (task {other}); "
                           "use a new key for a new request")
    if created is None:
        abort_json(404, code="task_not_found", field="Idempotency-Key",
                   message=f"Idempotency-Key: {idem_key!r} created a task that was deleted since")
    return created
