"""The web UI with ControlNet and depth models in real Chromium: the picked image becomes control_image, with its
strength or as a finished map, errors under the field, a phone and the light theme. Screenshots in SCREENSHOTS."""

from __future__ import annotations

import io

import pytest
import requests
from PIL import Image

from mflux_server import store
from mflux_server.testing import wait_for
from tests.process.test_web_ui import browser, sync_api  # noqa: F401  (the browser fixture)
from tests.process.test_web_ui_people import PHONE, SCREENSHOTS, open_page, shot, small
from tests.process.test_web_ui_people import pytestmark as needs_chromium

pytestmark = needs_chromium


def latest_task(url: str) -> dict:
    """The newest task, or {} before the first submit has landed."""
    tasks = requests.get(url + "/api/tasks", params={"limit": 1}, timeout=10).json()["tasks"]
    return tasks[0] if tasks else {}


@pytest.fixture
def guided(processes, tmp_path):
    url = processes.server()
    processes.worker("--models", "dev-controlnet-canny,dev-depth,schnell,dev-redux,dev-controlnet-upscaler", speed=10)
    photo = Image.new("RGB", (512, 512), "white")
    photo.paste((20, 20, 20), (128, 128, 384, 384))
    photo.save(tmp_path / "square.png")
    return url, tmp_path / "square.png"


def test_a_control_model_takes_the_picked_image_as_its_control_image(guided, browser):  # noqa: F811
    url, photo = guided
    page = open_page(browser, url)
    page.locator("#model").select_option("dev-controlnet-canny")
    assert page.locator("#image-label").inner_text() == "Control image"
    assert "follows the edges of the image" in page.locator("#model-hint").inner_text()
    assert page.locator("#control_strength").input_value() == "0.4", "the model's default strength"
    assert not page.locator("#control_map").is_visible(), "mflux always runs Canny: no map option"
    page.locator("#prompt").fill("a lighthouse")
    small(page)
    page.get_by_role("button", name="Generate").click()
    error = page.locator('[data-error-for="control_image"]')
    wait_for(lambda: "send control_image" in error.inner_text(), what="the missing control image under the field")
    page.locator("#image-file").set_input_files(str(photo))
    page.wait_for_function("document.querySelector('#init-preview').naturalWidth > 0", timeout=5000)  # read, async
    page.wait_for_function("document.querySelector('[data-error-for=\"control_image\"]').textContent === ''",
                           timeout=5000)  # picking the image clears its error
    page.locator("#control_strength").fill("0.9")
    small(page)
    shot(page, "control-canny")
    page.get_by_role("button", name="Generate").click()
    wait_for(lambda: (latest_task(url).get("control") or {}).get("strength") == 0.9, what="the control task")
    task = latest_task(url)
    assert task["control"] == {"type": "canny", "strength": 0.9, "preprocess": True} and task["model"] == \
        "dev-controlnet-canny"
    page.locator("#model").select_option("schnell")
    assert page.locator("#image-label").is_hidden() or page.locator("#image-label").inner_text() == "Init image"
    assert not page.errors, page.errors


def test_a_depth_map_is_sent_as_a_map_from_the_keyboard_on_a_phone_in_the_light_theme(guided, browser):  # noqa: F811
    url, photo = guided
    page = open_page(browser, url, PHONE, scheme="light")
    page.locator("#model").select_option("dev-depth")
    assert not page.locator("#control-strength-field").is_visible(), "FLUX.1 Depth takes no strength"
    page.locator("#image-file").set_input_files(str(photo))
    page.wait_for_function("document.querySelector('#init-preview').naturalWidth > 0", timeout=5000)  # read, async
    page.locator("#control_map").focus()
    page.keyboard.press("Space")
    assert page.locator("#control_map").is_checked()
    assert "depth map already" in page.locator("label:has(#control_map)").inner_text()
    page.locator("#prompt").fill("a reading room")
    small(page)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shot(page, "control-depth-phone-light")
    page.get_by_role("button", name="Generate").click()
    wait_for(lambda: latest_task(url).get("model") == "dev-depth", what="the depth task")
    assert latest_task(url)["control"] == {"type": "depth", "strength": None, "preprocess": False}
    done = latest_task(url)["task_id"]
    wait_for(lambda: requests.get(f"{url}/api/tasks/{done}", timeout=10).json()["status"] == "done",
             what="the depth task done", timeout=60)
    assert not page.errors, page.errors


def test_a_variation_model_takes_the_picked_image_as_its_image_prompt(guided, browser):  # noqa: F811
    url, photo = guided
    page = open_page(browser, url)
    page.locator("#model").select_option("dev-redux")
    assert page.locator("#image-label").inner_text() == "Image prompt"
    assert "draws variations of the image" in page.locator("#model-hint").inner_text()
    page.locator("#image-file").set_input_files(str(photo))
    page.wait_for_function("document.querySelector('#init-preview').naturalWidth > 0", timeout=5000)  # read, async
    page.locator("#prompt").fill("in autumn")
    assert page.locator("#prompt-strength-out").inner_text() == "model default"
    small(page)
    page.get_by_role("button", name="Generate").click()
    wait_for(lambda: latest_task(url).get("model") == "dev-redux", what="the variation task")
    task = latest_task(url)
    assert task["image_strengths"] == [] and task["width"] == 512, "untouched: the model's own strength"
    first = task["task_id"]
    page.locator("#prompt_strength").focus()
    for _ in range(8):  # from the keyboard: 1.00 down to 0.60
        page.keyboard.press("ArrowLeft")
    assert page.locator("#prompt-strength-out").inner_text() == "0.60"
    shot(page, "variation-strength")
    page.get_by_role("button", name="Generate").click()
    wait_for(lambda: latest_task(url).get("task_id") != first, what="the second variation task")
    assert latest_task(url)["image_strengths"] == [0.6]
    page.locator("#model").select_option("schnell")
    assert not page.locator("#prompt-strength-field").is_visible(), "only variation models take it"
    assert not page.errors, page.errors


def test_a_try_on_takes_a_person_a_painted_area_and_a_garment_picked_from_the_keyboard(processes, tmp_path,
                                                                                        browser):  # noqa: F811
    url = processes.server()
    processes.worker("--models", "dev-fill-catvton,schnell", speed=10)
    person, garment = tmp_path / "person.png", tmp_path / "garment.png"
    Image.new("RGB", (384, 512), (90, 120, 200)).save(person)
    Image.new("RGB", (256, 256), (200, 40, 40)).save(garment)
    page = open_page(browser, url, PHONE, scheme="light")
    page.locator("#model").select_option("dev-fill-catvton")
    assert page.locator("#image-label").inner_text() == "Person"
    assert "dresses the person" in page.locator("#model-hint").inner_text()
    assert page.locator("#garment-field").is_visible()
    page.locator("#image-file").set_input_files(str(person))
    page.wait_for_function("document.querySelector('#mask-canvas').width === 384", timeout=5000)  # sized on load
    page.locator("#mask-canvas").scroll_into_view_if_needed()  # below the fold on a phone
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=5)
    page.mouse.up()
    page.locator("#prompt").fill("a red shirt")
    page.get_by_role("button", name="Generate").click()
    error = page.locator('[data-error-for="garment_image"]')
    wait_for(lambda: "send garment_image" in error.inner_text(), what="the missing garment under its field")
    with page.expect_file_chooser() as chooser:
        page.locator("#garment-drop").focus()
        page.keyboard.press("Enter")
    chooser.value.set_files(str(garment))
    page.wait_for_function("document.querySelector('#garment-preview').naturalWidth > 0", timeout=5000)
    assert error.inner_text() == "", "picking the garment clears its error"
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    small(page)
    shot(page, "try-on-phone-light")
    page.get_by_role("button", name="Generate").click()
    wait_for(lambda: latest_task(url).get("model") == "dev-fill-catvton", what="the try-on task")
    from mflux_server import store

    db = store.connect(processes.db_path)
    try:
        inputs = db.inputs(latest_task(url)["task_id"])
    finally:
        db.close()
    kinds = {(found.width, found.height) for found in inputs.values()}
    assert len(inputs) == 3 and (256, 256) in kinds, "the person, the painted mask and the garment as sent"
    painted = Image.open(io.BytesIO(inputs["mask"].data)).convert("L")
    assert painted.size == (384, 512) and painted.getextrema() == (0, 255), "the painted area is white, the rest black"
    page.locator("#garment-clear").click()
    assert page.locator("#garment-preview").is_hidden() and page.locator("#garment-text").is_visible()
    assert not page.errors, page.errors


def test_a_gallery_image_is_upscaled_as_a_task_of_the_queue(guided, browser):  # noqa: F811
    url, _ = guided
    page = open_page(browser, url)
    page.locator("#model").select_option("schnell")
    small(page)
    page.locator("#prompt").fill("a harbour")
    page.get_by_role("button", name="Generate").click()
    item = page.locator("#gallery li").first
    item.wait_for(timeout=20000)
    source_seed = int(item.inner_text().split("seed ")[1].split(" ")[0])
    item.get_by_role("button", name="Upscale 2×").click()
    page.wait_for_function("document.querySelectorAll('#gallery li').length === 2", timeout=30000)
    upscaled = latest_task(url)
    assert upscaled["model"] == "dev-controlnet-upscaler" and (upscaled["width"], upscaled["height"]) == (1024, 1024)
    seed = requests.get(f"{url}/api/tasks/{upscaled['task_id']}", timeout=10).json()["seed"]
    assert seed == source_seed, "the source's seed"
    page.wait_for_function("document.querySelector('#gallery li img').naturalWidth === 1024", timeout=10000)
    shot(page, "upscaled")
    assert not page.errors, page.errors


def test_more_images_go_as_images_in_order_with_a_strength_each_for_variations(processes, tmp_path,
                                                                                browser):  # noqa: F811
    url = processes.server()
    processes.worker("--models", "flux2-klein-4b,dev-redux,schnell", speed=10)
    files = []
    for name, size, colour in (("first", (512, 512), "white"), ("second", (256, 384), "red"),
                               ("third", (320, 320), "blue")):
        Image.new("RGB", size, colour).save(tmp_path / f"{name}.png")
        files.append(str(tmp_path / f"{name}.png"))
    page = open_page(browser, url, PHONE, scheme="light")
    page.locator("#model").select_option("flux2-klein-4b")
    assert page.locator("#more-field").is_visible() and not page.locator("#more-drop").is_visible()
    assert "Pick the first image" in page.locator("#more-hint").inner_text()
    page.locator("#image-file").set_input_files(files[0])
    page.wait_for_function("document.querySelector('#init-preview').naturalWidth > 0", timeout=5000)
    with page.expect_file_chooser() as chooser:  # from the keyboard, as the other drop zones
        page.locator("#more-drop").focus()
        page.keyboard.press("Enter")
    chooser.value.set_files(files[1])
    wait_for(lambda: page.locator("#more-list li").count() == 1, what="the second image listed")
    page.locator("#more-file").set_input_files(files[2])
    wait_for(lambda: page.locator("#more-list li").count() == 2, what="the third image listed")
    assert page.locator("#more-room").inner_text() == "(2 of 3)"
    page.locator("#prompt").fill("the cat from the first on the sofa of the second")
    small(page)
    shot(page, "more-images-phone-light")
    page.get_by_role("button", name="Generate").click()
    wait_for(lambda: latest_task(url).get("model") == "flux2-klein-4b", what="the edit task")
    db = store.connect(processes.db_path)
    inputs = db.inputs(latest_task(url)["task_id"])
    assert [(role, image.width) for role, image in inputs.items()] == [("image", 512), ("image2", 256), ("image3", 320)]
    edit = latest_task(url)["task_id"]

    page.locator("#model").select_option("dev-redux")
    sliders = page.locator("#more-list input[type=range]")
    assert sliders.count() == 2 and page.locator("#more-list output").first.inner_text() == "model default"
    sliders.nth(1).focus()
    for _ in range(4):  # 1.00 down to 0.80, from the keyboard
        page.keyboard.press("ArrowLeft")
    assert page.locator("#more-list output").nth(1).inner_text() == "0.80"
    page.locator("#more-field").scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "more-images-variation-phone.png"))
    page.get_by_role("button", name="Generate").click()
    wait_for(lambda: latest_task(url).get("task_id") != edit, what="the variation task")
    variation = latest_task(url)
    assert variation["model"] == "dev-redux" and variation["image_strengths"] == [1.0, 1.0, 0.8]
    assert len(db.inputs(variation["task_id"])) == 3

    # Removing the first image moves the next one up: what is listed is what is sent.
    page.locator("#image-clear").click()
    page.wait_for_function("document.querySelector('#init-preview').naturalWidth === 256", timeout=5000)
    assert page.locator("#more-list li").count() == 1
    page.locator("#model").select_option("schnell")
    assert not page.locator("#more-field").is_visible(), "a text-to-image model takes no more images"
    db.close()
    assert not page.errors, page.errors
    desktop = open_page(browser, url)  # the dark scheme, wide
    desktop.locator("#model").select_option("dev-redux")
    desktop.locator("#image-file").set_input_files(files[0])
    desktop.wait_for_function("document.querySelector('#init-preview').naturalWidth > 0", timeout=5000)
    desktop.locator("#more-file").set_input_files(files[1])
    wait_for(lambda: desktop.locator("#more-list li").count() == 1, what="the image listed on the desktop")
    shot(desktop, "more-images-desktop-dark")
    assert not desktop.errors, desktop.errors


def test_then_upscale_on_the_form_queues_each_image_s_upscale_when_the_task_is_done(guided, browser):  # noqa: F811
    url, _ = guided
    page = open_page(browser, url, PHONE, scheme="light")
    page.locator("#model").select_option("dev-controlnet-upscaler")
    assert page.locator("#upscale-field").is_hidden(), "an upscaler is not upscaled after itself"
    page.locator("#model").select_option("schnell")
    small(page, count=2)
    page.locator("#prompt").fill("a harbour at night")
    page.locator("#upscale").focus()
    page.keyboard.press("ArrowDown")  # from the keyboard: "no" to "2×"
    assert page.locator("#upscale").input_value() == "2"
    hint = page.locator("#upscale-hint").inner_text()
    assert "1024×1024" in hint and "dev-controlnet-upscaler" in hint, hint
    page.locator("#width").fill("1536")  # the largest schnell runs here; twice that is past the server's 2048
    page.locator("#height").fill("1536")
    assert "3072×3072" in page.locator("#upscale-hint").inner_text()
    page.keyboard.press("Control+Enter")
    error = page.locator('[data-error-for="upscale"]')
    error.wait_for(timeout=10000)
    page.wait_for_function("document.querySelector('[data-error-for=\"upscale\"]').textContent.length > 0")
    assert "3072" in error.inner_text() and "2048" in error.inner_text(), error.inner_text()
    assert "invalid" in page.locator("#upscale").get_attribute("class")
    assert latest_task(url) == {}, "a refused request queues nothing"
    shot(page, "then-upscale-refused")
    small(page, count=2)
    page.locator("#prompt").focus()
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.querySelectorAll('#gallery li').length === 4", timeout=60000)
    tasks = requests.get(url + "/api/tasks", timeout=10).json()["tasks"]
    generated = next(task for task in tasks if task["model"] == "schnell")
    ups = requests.get(f"{url}/api/tasks/{generated['task_id']}", timeout=10).json()["upscale"]
    assert ups["upscaler"] == "dev-controlnet-upscaler" and len(ups["task_ids"]) == 2
    sources = [requests.get(f"{url}/api/tasks/{task_id}", timeout=10).json()["upscales"] for task_id in ups["task_ids"]]
    assert sources == [{"task_id": generated["task_id"], "index": 0}, {"task_id": generated["task_id"], "index": 1}]
    widths = page.evaluate("[...document.querySelectorAll('#gallery li img')].map((img) => img.naturalWidth)")
    assert sorted(widths) == [512, 512, 1024, 1024], widths
    assert page.locator("#queue li").count() == 0, "the upscales left the queue once done"
    shot(page, "then-upscale-done")
    assert not page.errors, page.errors


def test_without_a_reachable_server_the_form_offers_only_the_common_fields_and_throws_nothing(guided, browser):  # noqa: F811
    url, _ = guided
    page = browser.new_page(viewport=PHONE)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.add_init_script('localStorage.setItem("mflux.field.upscale", JSON.stringify("2"))')
    page.route("**/api/models", lambda route: route.abort())  # the server went away after serving the page
    page.goto(url + "/")
    page.locator("#server-note").filter(has_text="cannot reach the server").wait_for(timeout=10000)
    assert page.locator("#upscale").input_value() == "2", "the choice is remembered"
    assert page.locator("#upscale-field").is_hidden(), "no upscaler is known to be served"
    offered = page.evaluate("[...document.querySelectorAll('[data-needs]')].filter((el) => !el.hidden)"
                            ".map((el) => el.dataset.needs)")
    assert offered == [], f"no model known, so no field a model may not take: {offered}"
    assert page.locator("#prompt").is_visible() and page.locator("#width").is_visible()
    page.locator("#width").fill("640")  # the hint is recomputed on input
    shot(page, "server-unreachable-phone")
    assert not errors, errors
