"""The original mflux-server's model endpoints (/api/ls, /api/ps, /api/load) over real HTTP, and a page written the
way the original's is (opened from a file, calling the server cross-origin) driving them in Chromium."""

from __future__ import annotations

import os

import pytest
import requests

from tests.process.test_shared_service import auth, new_key
from tests.process.test_web_ui import CHROMIUM, browser  # noqa: F401  (the fixture)

# The original page's model calls, as its index.html makes them: fetch /api/ls into a <select>, /api/ps for the
# defaults, POST /api/load on a change, then POST /api/generate with no model and poll /api/status.
ORIGINAL_STYLE_PAGE = """<!doctype html><meta charset="utf-8"><title>original-style</title>
<select id="model-select"></select><input id="steps"><pre id="log"></pre>
<script>
var mfluxendpoint = "%s";
function log(text) { document.getElementById('log').textContent += text + "\\n"; }
async function run() {
  var models = await (await fetch(mfluxendpoint + '/api/ls')).json();
  var select = document.getElementById('model-select');
  Object.keys(models).forEach(function (name) {
    var opt = document.createElement('option'); opt.value = name; opt.textContent = name; select.appendChild(opt);
  });
  var settings = await (await fetch(mfluxendpoint + '/api/ps')).json();
  document.getElementById('steps').value = settings.default_steps;
  log('ps ' + settings.model);
  var loaded = await fetch(mfluxendpoint + '/api/load', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                         body: JSON.stringify({model: 'dev'})});
  var after = await loaded.json();
  document.getElementById('steps').value = after.default_steps;
  log('load ' + loaded.status + ' ' + after.model);
  var made = await (await fetch(mfluxendpoint + '/api/generate', {method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({prompt: 'original page', width: 256, height: 256, steps: 2, seed: '7'})})).json();
  for (;;) {
    var status = await (await fetch(mfluxendpoint + '/api/status?task_id=' + made.task_id)).json();
    if (status.status === 'done') break;
    await new Promise(function (r) { setTimeout(r, 100); });
  }
  var task = await (await fetch(mfluxendpoint + '/api/tasks/' + made.task_id)).json();
  log('done ' + task.model);
}
run().catch(function (e) { log('failed ' + e); });
</script>"""


def test_the_original_model_endpoints_answer_in_its_shapes_and_load_sets_the_default(processes):
    url = processes.server()
    processes.worker("--models", "schnell,dev", speed=20)
    listing = requests.get(url + "/api/ls", timeout=10).json()
    assert listing == {"dev": {"loader": "flux1", "steps": 25}, "schnell": {"loader": "flux1", "steps": 4}}, listing
    assert requests.get(url + "/api/ps", timeout=10).json() == {"model": "schnell", "quantize": None, "cache_limit": 0,
                                                                 "default_steps": 4}
    refused = requests.post(url + "/api/load", json={"model": "krea-dev"}, timeout=10)
    assert refused.status_code == 400 and refused.json()["field"] == "model", refused.text
    wrong_bits = requests.post(url + "/api/load", json={"model": "dev", "quantize": 4}, timeout=10)
    assert wrong_bits.status_code == 400 and wrong_bits.json()["field"] == "quantize", wrong_bits.text
    loaded = requests.post(url + "/api/load", json={"model": "dev"}, timeout=10)
    assert loaded.json() == {"model": "dev", "quantize": None, "cache_limit": 0, "default_steps": 25}, loaded.text
    made = requests.post(url + "/api/generate", json={"prompt": "no model named", "width": 256, "height": 256},
                         timeout=10).json()
    assert made["model"] == "dev" and requests.get(url + "/api/info", timeout=10).json()["default_model"] == "dev"
    other_process = processes.server()  # every server process reads the same default
    assert requests.get(other_process + "/api/ps", timeout=10).json()["model"] == "dev"


def test_once_keys_exist_only_an_admin_key_may_change_the_default_model(processes):
    url = processes.server()
    processes.worker("--models", "schnell,dev", speed=20)
    user, admin = new_key(processes.db_path, "user"), new_key(processes.db_path, "root", "--admin")
    denied = requests.post(url + "/api/load", json={"model": "dev"}, headers=auth(user), timeout=10)
    assert denied.status_code == 403 and denied.json()["code"] == "admin_only", denied.text
    allowed = requests.post(url + "/api/load", json={"model": "dev"}, headers=auth(admin), timeout=10)
    assert allowed.status_code == 200 and allowed.json()["model"] == "dev"


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="LOUD SKIP: no chromium here (make test installs Debian's where it can)")
def test_a_page_like_the_originals_opened_from_a_file_lists_switches_and_generates(processes, browser, tmp_path):  # noqa: F811
    url = processes.server()
    processes.worker("--models", "schnell,dev", speed=20)
    page_file = tmp_path / "index.html"
    page_file.write_text(ORIGINAL_STYLE_PAGE % url)
    page = browser.new_page()
    page.goto(page_file.as_uri())  # origin "null": the default CORS rules let a local file call the server
    page.wait_for_function("document.getElementById('log').textContent.includes('done') || "
                           "document.getElementById('log').textContent.includes('failed')", timeout=30_000)
    log = page.locator("#log").text_content() or ""
    assert "failed" not in log, log
    assert page.locator("#model-select option").all_text_contents() == ["dev", "schnell"]
    assert "ps schnell" in log and "load 200 dev" in log and "done dev" in log, log
    assert page.locator("#steps").input_value() == "25", "the page took the loaded model's default steps"
