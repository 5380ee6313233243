"""The web UI in a real browser (Playwright driving Debian's Chromium) against the real server and a synthetic worker."""

from __future__ import annotations

import base64
import io
import os
import shutil

import pytest
import requests
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="LOUD SKIP: playwright is not installed (make test installs it)")
pytestmark = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                reason="LOUD SKIP: no chromium here (make test installs Debian's where it can)")


@pytest.fixture
def browser():
    assert CHROMIUM, "CI must have chromium: make test installs it"
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def ui(processes, browser):
    """The page on a server whose worker takes about half a second a step, so progress can be watched."""
    url = processes.server()
    processes.worker("--models", "schnell,dev-fill", "--synthetic-step", "0.4,0,0", "--synthetic-fixed", "0.1,0.1",
                     speed=1)
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    yield page, url
    assert not errors, errors


def fill_small(page, steps: int) -> None:
    page.get_by_role("textbox", name="Prompt").fill("a lighthouse at dusk")
    page.locator("#preset").select_option("512")
    page.locator("#steps").fill(str(steps))


def test_three_images_show_progress_and_previews_then_land_in_the_gallery_and_download(ui, tmp_path):
    page, url = ui
    fill_small(page, 5)
    for _ in range(3):
        page.get_by_role("button", name="Generate").click()
        page.wait_for_timeout(150)
    assert page.locator("#queue li").count() == 3
    page.wait_for_function("[...document.querySelectorAll('#queue [role=progressbar]')]"
                           ".some(bar => Number(bar.getAttribute('aria-valuenow')) > 0)", timeout=15000)
    page.wait_for_selector("#queue img.thumb[src*='/preview']", timeout=15000)
    page.screenshot(path=str(tmp_path / "running.png"))
    page.wait_for_function("document.querySelectorAll('#gallery li').length === 3", timeout=30000)
    assert page.locator("#queue li").count() == 0
    with page.expect_download() as waiting:
        page.locator("#gallery li").first.get_by_role("link", name="Download").click()
    saved = tmp_path / waiting.value.suggested_filename
    waiting.value.save_as(saved)
    assert saved.suffix == ".png" and Image.open(saved).size == (512, 512)
    Image.open(saved).verify()


def test_a_running_task_is_canceled_from_its_queue_card(ui):
    page, url = ui
    fill_small(page, 40)
    page.get_by_role("button", name="Generate").click()
    card = page.locator("#queue li").first
    card.locator(".meta", has_text="step").wait_for(timeout=10000)
    task_id = card.get_attribute("data-task")
    card.get_by_role("button", name="Cancel").click()
    page.wait_for_function("document.querySelectorAll('#queue li').length === 0", timeout=10000)
    assert requests.get(f"{url}/api/tasks/{task_id}", timeout=5).json()["status"] == "canceled"


def test_a_bad_size_shows_the_servers_message_next_to_the_field(ui):
    page, _ = ui
    page.get_by_role("textbox", name="Prompt").fill("x")
    page.locator("#width").fill("1000")
    page.get_by_role("button", name="Generate").click()
    message = page.locator('[data-error-for="width"]')
    message.wait_for(timeout=5000)
    assert "multiple of 16" in message.inner_text()
    assert "invalid" in page.locator("#width").get_attribute("class")
    assert page.locator("#queue li").count() == 0


def test_a_reload_mid_generation_restores_the_queue_and_it_finishes(ui):
    page, _ = ui
    fill_small(page, 8)
    page.get_by_role("button", name="Generate").click()
    page.locator("#queue li .meta", has_text="step").wait_for(timeout=10000)
    task_id = page.locator("#queue li").first.get_attribute("data-task")
    page.reload()
    assert page.locator(f'#queue li[data-task="{task_id}"]').count() == 1
    assert page.get_by_role("textbox", name="Prompt").input_value() == "a lighthouse at dusk", "settings persist"
    page.wait_for_function("document.querySelectorAll('#gallery li').length === 1", timeout=20000)


def test_inpaint_models_paint_a_mask_over_the_image_and_the_layout_fits_a_phone(ui, tmp_path, browser):
    page, url = ui
    page.locator("#model").select_option("dev-fill")
    assert page.locator("#guidance").is_visible() and not page.locator("#strength-field").is_visible()
    source = tmp_path / "photo.png"
    Image.linear_gradient("L").resize((256, 256)).convert("RGB").save(source)
    page.locator("#image-file").set_input_files(str(source))
    canvas = page.locator("#mask-canvas")
    canvas.wait_for(timeout=5000)
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.get_by_role("textbox", name="Prompt").fill("a hat")
    page.locator("#steps").fill("2")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.querySelectorAll('#gallery li').length === 1", timeout=20000)
    result = Image.open(io.BytesIO(requests.get(url + page.locator("#gallery img").first.get_attribute("src"),
                                                timeout=5).content)).convert("RGB")
    assert result.size == (256, 256)
    corner = Image.open(source).getpixel((250, 250))  # unpainted: kept exactly
    assert result.getpixel((250, 250)) == corner
    assert result.getpixel((128, 128)) != Image.open(source).getpixel((128, 128)), "the painted area was repainted"
    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(url + "/")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page overflows a phone's width: {width}px"
    phone.screenshot(path=str(tmp_path / "phone.png"), full_page=True)  # kept in tmp_path for a look on failure


def _gradient_data_url() -> str:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((320, 192)).convert("RGB").save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# Builds a File from a data URL inside the page, and hands it over as a browser's paste or drop would.
_HAND_OVER = """async ([kind, url]) => {
  const blob = await (await fetch(url)).blob(), data = new DataTransfer();
  data.items.add(new File([blob], "pasted.png", { type: "image/png" }));
  if (kind === "paste") document.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true }));
  else for (const type of ["dragover", "drop"])
    document.querySelector("#drop").dispatchEvent(new DragEvent(type, { dataTransfer: data, bubbles: true, cancelable: true }));
}"""


@pytest.mark.parametrize("kind", ["paste", "drop"])
def test_an_init_image_can_be_pasted_or_dropped_and_sets_the_size(ui, kind):
    page, _ = ui
    assert page.locator("#init-preview").is_hidden()
    page.evaluate(_HAND_OVER, [kind, _gradient_data_url()])
    page.wait_for_function("document.querySelector('#init-preview').naturalWidth === 320", timeout=5000)
    assert page.locator("#init-preview").is_visible()
    assert (page.locator("#width").input_value(), page.locator("#height").input_value()) == ("320", "192")
    page.get_by_role("button", name="Remove image").click()
    assert page.locator("#init-preview").is_hidden()


def test_a_mask_stroke_can_be_undone(ui, tmp_path):
    page, _ = ui
    page.locator("#model").select_option("dev-fill")
    source = tmp_path / "photo.png"
    Image.new("RGB", (256, 256), (40, 90, 160)).save(source)
    page.locator("#image-file").set_input_files(str(source))
    canvas = page.locator("#mask-canvas")
    canvas.wait_for(timeout=5000)
    undo = page.get_by_role("button", name="Undo stroke")
    assert undo.is_disabled(), "nothing to undo before the first stroke"
    box = canvas.bounding_box()
    painted = "([x, y]) => document.querySelector('#mask-canvas').getContext('2d').getImageData(x, y, 1, 1).data[3]"
    for x in (0.2, 0.8):  # two strokes, one on each side
        page.mouse.move(box["x"] + box["width"] * x, box["y"] + box["height"] / 2)
        page.mouse.down()
        page.mouse.up()
    assert page.evaluate(painted, [51, 128]) > 0 and page.evaluate(painted, [204, 128]) > 0
    undo.click()
    assert page.evaluate(painted, [204, 128]) == 0, "the second stroke is gone"
    assert page.evaluate(painted, [51, 128]) > 0, "the first stays"
    undo.click()
    assert page.evaluate(painted, [51, 128]) == 0 and undo.is_disabled()


def test_without_event_streams_the_page_polls_and_still_shows_progress(processes, browser):
    url = processes.server()
    processes.worker("--synthetic-step", "0.3,0,0", "--synthetic-fixed", "0.1,0.1", speed=1)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script("delete window.EventSource")  # as in browsers or proxies where streams fail
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    fill_small(page, 6)
    page.get_by_role("button", name="Generate").click()
    page.locator("#queue li .meta", has_text="step").wait_for(timeout=10000)
    page.wait_for_function("document.querySelectorAll('#gallery li').length === 1", timeout=20000)
    assert page.evaluate("typeof EventSource") == "undefined"


def test_gallery_items_open_full_size_reuse_their_seed_and_become_the_init_image(ui):
    page, _ = ui
    page.locator("#model").select_option("schnell")
    fill_small(page, 2)
    page.locator("#seed-random").uncheck()
    page.locator("#seed").fill("4242")
    page.get_by_role("button", name="Generate").click()
    item = page.locator("#gallery li").first
    item.wait_for(timeout=20000)
    assert "seed 4242" in item.inner_text()
    page.locator("#seed-random").check()
    page.locator("#seed").fill("")
    item.get_by_role("button", name="Reuse seed").click()
    assert page.locator("#seed").input_value() == "4242" and not page.locator("#seed-random").is_checked()
    item.locator("img").click()
    assert page.locator("#viewer").is_visible()
    page.wait_for_function("document.querySelector('#viewer-img').naturalWidth === 512", timeout=5000)
    page.get_by_role("button", name="Close").click()
    assert page.locator("#viewer").is_hidden()
    item.get_by_role("button", name="Use as init").click()
    page.wait_for_function("document.querySelector('#init-preview').naturalWidth === 512", timeout=5000)
    item.get_by_role("button", name="Delete").click()
    page.wait_for_function("document.querySelectorAll('#gallery li').length === 0", timeout=5000)
    assert page.locator("#gallery-empty").is_visible()


def test_with_no_worker_running_a_queued_task_says_it_waits_for_one(processes, browser):
    url = processes.server()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    fill_small(page, 4)
    page.get_by_role("button", name="Generate").click()
    note = page.locator("#queue li .waiting-note")
    note.wait_for(timeout=5000)
    assert "no worker is running" in note.inner_text()
    assert "no live worker" in page.locator("#server-note").inner_text()


def test_on_a_server_with_keys_the_page_asks_for_one_and_then_works(processes, browser, tmp_path):
    import subprocess
    import sys

    made = subprocess.run([sys.executable, "-m", "mflux_server", "keys", "create", "browser", "--db", processes.db_path],
                          capture_output=True, text=True, timeout=60)
    key = made.stdout.strip().splitlines()[-1]
    url = processes.server()
    processes.worker(speed=20)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url + "/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for(state="visible", timeout=10000)
    page.screenshot(path=str(tmp_path / "key-dialog.png"))
    page.locator("#key-input").fill("mfx_not-a-key")
    page.get_by_role("button", name="Use this key").click()
    page.wait_for_function("document.querySelector('#key-dialog').open && "
                           "document.querySelector('#key-error').textContent.includes('refused')", timeout=10000)
    page.locator("#key-input").fill(key)
    page.get_by_role("button", name="Use this key").click()
    page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=10000)
    assert not dialog.is_visible()
    fill_small(page, 2)
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#gallery img", timeout=20000)  # events (cookie) and the image (<img>, cookie) both worked
    page.screenshot(path=str(tmp_path / "with-key.png"))
    listed = requests.get(f"{url}/api/tasks", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    assert listed["total"] == 1, "the task belongs to the page's key"
