"""The web UI's LoRA picker in real Chromium: only LoRAs that fit the model, scales sent, errors under the field,
the keyboard, a phone and the light theme. Screenshots land in SCREENSHOTS."""

from __future__ import annotations

import time

import pytest
import requests

from mflux_server.testing import wait_for
from tests.fast.test_loras import keys_only_in, write_lora
from tests.process.test_web_ui import browser, sync_api  # noqa: F401  (the browser fixture)
from tests.process.test_web_ui_people import PHONE, open_page, shot, small
from tests.process.test_web_ui_people import pytestmark as needs_chromium

pytestmark = needs_chromium


@pytest.fixture
def with_library(processes, tmp_path):
    folder = tmp_path / "loras"
    flux = keys_only_in("flux1", "qwen-image")
    write_lora(folder / "ink.safetensors", flux)
    write_lora(folder / "styles" / "a-rather-long-name-for-a-watercolour-paper-texture.safetensors", flux)
    write_lora(folder / "qwen-only.safetensors", keys_only_in("qwen-image", "flux1"))
    url = processes.server("--lora-dir", str(folder))
    processes.worker("--models", "schnell,fibo", "--lora-dir", str(folder), speed=10)
    return url, folder


def latest_task(url: str) -> dict:
    return requests.get(url + "/api/tasks", params={"limit": 1}, timeout=10).json()["tasks"][0]


def schnell_with_one_lora(browser, url: str, prompt: str):  # noqa: F811
    """The page with schnell chosen, a small size, a prompt and one LoRA row added."""
    page = open_page(browser, url)
    page.locator("#model").select_option("schnell")
    small(page)
    page.locator("#prompt").fill(prompt)
    page.get_by_role("button", name="Add LoRA").click()
    return page


def test_loras_that_fit_the_model_are_picked_and_sent_with_their_scales(with_library, browser):  # noqa: F811
    url, _ = with_library
    page = schnell_with_one_lora(browser, url, "a harbour at dawn")
    page.get_by_role("button", name="Add LoRA").click()
    selects = page.locator("#lora-list select")
    long_name = "styles/a-rather-long-name-for-a-watercolour-paper-texture"
    assert selects.first.locator("option").all_text_contents() == ["ink", long_name], "qwen-only fits no FLUX.1"
    selects.nth(1).select_option(long_name)
    page.locator("#lora-list input").nth(1).fill("0.6")
    assert page.evaluate("document.documentElement.scrollWidth") <= page.evaluate("window.innerWidth")
    shot(page, "loras-picked")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_selector("#queue li")
    assert latest_task(url)["loras"] == [{"name": "ink", "scale": 1.0}, {"name": long_name, "scale": 0.6}]
    page.get_by_role("button", name="remove this LoRA").first.click()
    assert selects.count() == 1
    page.locator("#model").select_option("fibo")  # mflux has no LoRA mapping for FIBO: no field
    assert not page.locator("#loras-field").is_visible()
    page.locator("#model").select_option("schnell")
    assert page.locator("#loras-field").is_visible() and selects.count() == 1, "the row came back with its model"
    assert not page.errors, page.errors


def test_a_lora_gone_from_the_library_shows_its_error_under_the_field(with_library, browser):  # noqa: F811
    url, folder = with_library
    page = schnell_with_one_lora(browser, url, "x")
    (folder / "ink.safetensors").unlink()
    time.sleep(2.1)  # the API rereads its folder every 2 s
    page.get_by_role("button", name="Generate").click()
    error = page.locator('[data-error-for="loras"]')
    wait_for(lambda: "no LoRA named 'ink'" in error.inner_text(), what="the error under the LoRA field")
    shot(page, "loras-error")
    page.locator("#lora-list input").first.fill("0.5")
    assert error.inner_text() == "", "editing the row clears its error"


def test_the_picker_works_from_the_keyboard_on_a_phone_in_the_light_theme(with_library, browser):  # noqa: F811
    url, _ = with_library
    page = open_page(browser, url, PHONE, scheme="light")
    page.locator("#model").select_option("schnell")
    page.locator("#lora-add").focus()
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "LoRA", "focus moves to the new row"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "scale"
    page.keyboard.type("5")
    page.locator("#prompt").fill("x")
    small(page)
    page.get_by_role("button", name="Generate").click()
    error = page.locator('[data-error-for="loras"]')
    wait_for(lambda: "less than or equal to 4" in error.inner_text(), what="the scale's range under the field")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shot(page, "loras-phone-light")
