"""A real worker signs what it makes; the client's inspect reads it back without the server."""

from __future__ import annotations

import json
from pathlib import Path

import requests

from mflux_server.worker.generation_data import DIGITAL_SOURCE_TYPE
from tests.conftest import submit, wait_status
from tests.process.test_client import run_cli
from tests.process.test_web_ui import browser, sync_api  # noqa: F401  (the browser fixture)
from tests.process.test_web_ui_people import pytestmark as needs_chromium


def test_an_image_carries_its_generation_data_and_verified_credentials_and_inspect_reads_them(processes,
                                                                                              tmp_path: Path):
    url = processes.server()
    worker = processes.worker("--c2pa-dir", str(tmp_path / "credentials"))
    task_id = submit(url, prompt="a lighthouse", seed=5, width=256, height=192, steps=2, format="JPEG")
    wait_status(url, task_id, ("done",))
    picture = tmp_path / "out.jpg"
    picture.write_bytes(requests.get(f"{url}/api/image", params={"task_id": task_id, "delete": "false"},
                                     timeout=10).content)
    shown = run_cli("inspect", str(picture))
    assert shown.returncode == 0, shown.stderr
    found = json.loads(shown.stdout)
    assert found["digital_source_type"] == DIGITAL_SOURCE_TYPE
    assert found["generation_data"]["prompt"] == "a lighthouse" and found["generation_data"]["seed"] == 5
    credentials = found["content_credentials"]
    assert credentials["state"] == "Valid" and credentials["failures"] == ["signingCredential.untrusted"]
    assert credentials["actions"][0]["action"] == "c2pa.created"
    view = requests.get(f"{url}/api/tasks/{task_id}", timeout=10).json()
    assert view["metadata"]["content_credentials"] == [True] and view["metadata"]["prompt"] is True
    assert "SELF-SIGNED" in processes.log(worker) and (tmp_path / "credentials" / "signer-chain.pem").is_file()
    private = submit(url, prompt="a secret harbour", width=256, height=192, steps=2, format="PNG", private=True)
    wait_status(url, private, ("done",))
    data = requests.get(f"{url}/api/image", params={"task_id": private, "delete": "false"}, timeout=10).content
    assert b"secret harbour" not in data and DIGITAL_SOURCE_TYPE.encode() in data


@needs_chromium
def test_the_web_ui_viewer_shows_what_an_image_carries_in_both_schemes_and_on_a_phone(processes, browser):  # noqa: F811
    from tests.process.test_web_ui_people import PHONE, SCREENSHOTS, open_page, small

    url = processes.server()
    processes.worker(speed=20)
    for viewport, scheme, name in ((None, "dark", "provenance"), (PHONE, "light", "provenance-phone-light")):
        page = open_page(browser, url, viewport, scheme=scheme)
        page.locator("#model").select_option("schnell")
        small(page)
        page.locator("#prompt").fill("a lighthouse in fog " + "with a very long description " * 12)
        page.get_by_role("button", name="Generate").click()
        item = page.locator("#gallery li").first
        item.wait_for(timeout=20000)
        item.locator("img").click()
        page.locator("#viewer-provenance summary").click()
        page.wait_for_function("document.querySelector('#provenance-list').textContent.includes('Credentials')",
                               timeout=10000)
        text = page.locator("#provenance-list").inner_text()
        assert "trainedAlgorithmicMedia" in text and "a lighthouse in fog" in text
        assert "Valid (signingCredential.untrusted)" in text and "schnell · seed" in text
        assert page.evaluate("document.documentElement.scrollWidth") <= page.evaluate("window.innerWidth")
        last = page.locator("#provenance-list dd").last
        last.scroll_into_view_if_needed()  # the dialog scrolls: on a phone the panel is below the image
        box, height = last.bounding_box(), page.evaluate("window.innerHeight")
        assert box is not None and 0 <= box["y"] and box["y"] + box["height"] <= height, "reachable, on screen"
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))
        assert not page.errors, page.errors
