"""Cross-origin rules as one design: the Host the API answers to, CORS for local pages, cross-site writes refused."""

from __future__ import annotations

import pytest

from mflux_server.api.app import create_app
from mflux_server.core.rows import Status
from mflux_server.core.settings import Settings

FORM = {"content_type": "multipart/form-data"}


def client_with(db_path: str, **settings):
    return create_app(Settings(db=db_path, stale_after=2.0, **settings)).test_client()


def queued(client) -> int:
    return client.application.extensions["mflux_sessions"].get().status_counts()[Status.WAITING]


@pytest.mark.parametrize("host, allowed", [
    ("localhost:4030", True), ("127.0.0.1:4030", True), ("[::1]:4030", True), ("192.168.1.20:4030", True),
    ("app.localhost", True), ("evil.example", False), ("evil.example:4030", False), ("127.0.0.1.nip.io", False),
    ("LOCALHOST", True), ("localhost.", False),
])
def test_only_local_names_and_ip_addresses_are_answered_by_default(client, host, allowed):
    response = client.get("/api/info", headers={"Host": host})
    assert (response.status_code != 421) == allowed, response.json
    if not allowed:
        assert response.json["code"] == "host_not_allowed" and "--allowed-hosts" in response.json["message"]


def test_a_dns_rebound_page_cannot_read_tasks_or_prompts(client):
    client.post("/api/generate", json={"prompt": "my secret prompt"})
    rebound = client.get("/api/tasks", headers={"Host": "attacker.example"})
    assert rebound.status_code == 421 and "my secret prompt" not in rebound.get_data(as_text=True)


def test_allowed_hosts_and_the_public_url_add_names(db_path):
    named = client_with(db_path, allowed_hosts=["gpu.lan"], public_url="https://images.example.com/")
    assert named.get("/api/info", headers={"Host": "gpu.lan:4030"}).status_code == 200
    assert named.get("/api/info", headers={"Host": "images.example.com"}).status_code == 200
    assert named.get("/api/info", headers={"Host": "other.lan"}).status_code == 421
    anything = client_with(db_path, allowed_hosts=["*"])
    assert anything.get("/api/info", headers={"Host": "whatever.example"}).status_code == 200


@pytest.mark.parametrize("headers", [{"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "http://localhost.evil.example"}])
def test_a_cross_site_form_post_is_refused_and_nothing_is_queued(client, headers):
    response = client.post("/api/generate", data={"prompt": "from another site"}, headers=headers, **FORM)
    assert response.status_code == 403 and response.json["code"] == "cross_origin_refused", response.json
    assert queued(client) == 0
    task = client.post("/api/generate", json={"prompt": "mine"}).json["task_id"]
    assert client.delete(f"/api/tasks/{task}", headers=headers).status_code == 403
    assert queued(client) == 1


@pytest.mark.parametrize("origin", ["http://localhost:8080", "http://127.0.0.1:5500", "http://[::1]:3000", "null"])
def test_a_page_on_this_machine_may_call_the_api_with_cors(client, origin):
    preflight = client.options("/api/generate", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in
                                                 preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert "Access-Control-Allow-Credentials" not in preflight.headers
    assert "Access-Control-Allow-Private-Network" not in preflight.headers
    posted = client.post("/api/generate", json={"prompt": "from a local page"}, headers={"Origin": origin})
    assert posted.status_code == 200 and posted.headers["Access-Control-Allow-Origin"] == origin
    assert "Origin" in posted.headers["Vary"]


def test_other_origins_get_no_cors_headers_and_the_own_ui_needs_none(client):
    preflight = client.options("/api/generate", headers={"Origin": "https://evil.example",
                                                         "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in preflight.headers
    read = client.get("/api/info", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in read.headers
    own = client.post("/api/generate", json={"prompt": "from the web UI"}, headers={"Origin": "http://localhost"})
    assert own.status_code == 200, "the server's own page (same origin) posts as always"


def test_configured_origins_replace_the_local_default(db_path):
    client = client_with(db_path, cors_origins=["https://app.example.com"])
    allowed = client.post("/api/generate", json={"prompt": "x"}, headers={"Origin": "https://app.example.com"})
    assert allowed.status_code == 200 and allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert client.post("/api/generate", json={"prompt": "x"}, headers={"Origin": "null"}).status_code == 403
    assert client.post("/api/generate", json={"prompt": "x"},
                       headers={"Origin": "http://localhost:8080"}).status_code == 403
