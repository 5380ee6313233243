"""Documentation matches the code: every setting, endpoint and family is on its docs page, every link leads
somewhere, and every flag the docs name is one a command takes."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from mflux_server.core.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
CONFIGURATION = (DOCS / "configuration.md").read_text()
API = (DOCS / "api.md").read_text()
MODELS = (DOCS / "models.md").read_text()


def test_every_setting_is_in_the_configuration_table_with_its_default():
    rows = {m.group(1): m.group(3)
            for m in re.finditer(r"^\| `--([a-z0-9-]+)` \| `([A-Z0-9_]+)` \| `([^`]*)` \|", CONFIGURATION, re.M)}
    for f in fields(Settings):
        flag = f.name.replace("_", "-")
        assert flag in rows, f"--{flag} is missing from the table in docs/configuration.md"
        assert f"`{env_name(f.name)}`" in CONFIGURATION
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(f"{v:g}" for v in default)
        elif default is None:
            default = "none"
        elif isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, float):
            default = f"{default:g}"
        if f.name != "db":
            assert rows[flag] == str(default), f"--{flag}: docs/configuration.md says {rows[flag]}, code says {default}"


def test_every_endpoint_is_in_the_api_page_and_fully_described_in_the_spec(client):
    spec = client.get("/openapi.json").json
    for path, operations in spec["paths"].items():
        plain = re.sub(r"\{(\w+)\}", r"<\1>", path)
        if path.startswith("/api"):
            assert plain in API, f"{path} is not documented in docs/api.md"
        for method, operation in operations.items():
            if method == "parameters":
                continue
            assert operation.get("summary") or operation.get("description"), f"{method} {path} has no description"
            assert "200" in operation["responses"], f"{method} {path} documents no success response"
    generate = spec["paths"]["/api/generate"]["post"]
    assert {"200", "422"} <= set(generate["responses"])
    assert set(spec["paths"]["/api/image"]["get"]["responses"]) >= {"200", "404", "409"}
    body = spec["components"]["schemas"]["GenerateRequest"]["properties"]
    assert {"prompt", "seed", "width", "height", "steps", "guidance", "format", "quality", "priority", "count",
            "model"} <= set(body)
    assert all(prop.get("description") for prop in body.values())
    status = next(p for p in spec["paths"]["/api/tasks"]["get"]["parameters"] if p["name"] == "status")
    assert status["schema"] == {"type": "string", "enum": ["waiting", "processing", "done", "error", "canceled"]}


def test_original_curl_paths_and_fields_are_in_the_readme():
    for snippet in ("'http://localhost:4030/api/generate'", '"seed": "1725311496"', "/api/status?task_id=",
                    "/api/image?task_id=", "make run", "make test"):
        assert snippet in README


def test_the_family_table_matches_the_catalog():
    from mflux_server.core import catalog

    columns = ["text_to_image", "image_to_image", "edit", "inpaint", "negative_prompt", "guidance", "loras", "control",
               "upscale", "variation", "try_on"]
    rows = {m.group(1): m.group(2).split(" | ")
            for m in re.finditer(r"^\| [^|]*\(`([a-z0-9.-]+)`\) \| (.*) \|$", MODELS, re.M)}
    families = {info.family for info in catalog.models()}
    assert set(rows) == families, "every family has one row"
    for family, cells in rows.items():
        members = [info for info in catalog.models() if info.family == family]
        for column, cell in zip(columns, cells[2:], strict=True):
            said = {part.startswith("yes") for part in cell.split("/")}
            assert said == {getattr(info.capabilities, column) for info in members}, f"{family}: {column} says {cell}"
        references = {info.max_reference_images if info.capabilities.edit else 0 for info in members}
        assert cells[4] == ("–" if references == {0} else "yes, 1 image" if references == {1}
                            else f"yes, up to {max(references)} images"), family


def anchors_of(text: str) -> set[str]:
    """The anchors GitHub makes of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)}


def test_every_link_in_the_docs_leads_to_a_file_and_heading_that_exist():
    pages = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]
    checked = 0
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"```.*?```", "", text, flags=re.S)):
            if re.match(r"[a-z]+:", target):
                continue  # http(s): and mailto: links leave the repository
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
            if anchor:
                assert anchor in anchors_of(linked.read_text()), f"{page.relative_to(ROOT)}: no heading #{anchor} in {path}"
            checked += 1
    assert checked > 30, checked


def test_the_readme_is_what_a_newcomer_needs_first_and_every_page_is_in_the_index():
    assert len(README.splitlines()) < 150
    for heading in ("## Two commands", "## One request", "## The web UI", "## Where to go next"):
        assert heading in README
    index = (DOCS / "index.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "index.md":
            assert f"]({page.name})" in index, f"docs/index.md does not list {page.name}"


def help_text(*command: str) -> str:
    """What a command's --help says."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", *command, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_flag_the_docs_name_is_one_a_command_takes():
    from concurrent.futures import ThreadPoolExecutor

    commands = [("mflux_server",), ("mflux_server.worker",), ("mflux_server.client.cli",),
                ("mflux_server.client.cli", "generate")]
    with ThreadPoolExecutor(len(commands)) as pool:  # four Pythons starting at once, not one after another
        api, worker, client, client_generate = pool.map(lambda command: help_text(*command), commands)
    helps = {"API": api, "worker": worker}
    client += client_generate
    for match in re.finditer(r"^\| `(--[a-z-]+)` \| `[A-Z_]+` \| `[^`]*` \| ([^|]+) \|", CONFIGURATION, re.M):
        flag, roles = match.group(1), match.group(2)
        for role in ("API", "worker"):
            if role in roles:
                assert re.search(rf"{flag}\b", helps[role]), f"{flag} is documented for the {role} but not in its --help"
    everything = helps["API"] + helps["worker"] + client
    named = set()
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for code in re.findall(r"`([^`\n]+)`", page.read_text()):
            named.update(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", code))
    # pip's, python -m bench's, bench.engine_check's and tests.fuzzing's own flags
    outside = {"--help", "--only", "--smoke", "--no-deps", "--out", "--families", "--examples"}
    unknown = sorted(flag for flag in named - outside if not re.search(rf"{flag}\b", everything))
    assert not unknown, f"the docs name flags no command takes: {unknown}"
    assert len(named) > 50, named


def test_the_document_built_on_first_read_is_whole_and_the_same_for_readers_at_once(app):
    from concurrent.futures import ThreadPoolExecutor

    from flask import url_for

    api = app.extensions["flask-smorest"]["apis"][""]["ext_obj"]
    assert api._pending_docs, "a new app documents its views when the document is first read, not at start"
    rule = next(rule for rule in app.url_map.iter_rules() if rule.endpoint == "web_assets")
    build = rule._build.__func__
    cells = dict(zip(build.__code__.co_freevars, build.__closure__, strict=True))
    compiled = cells["compiled"].cell_contents
    assert compiled == [], "no URL builder compiled at start"
    with ThreadPoolExecutor(4) as pool:
        documents = list(pool.map(lambda _: app.test_client().get("/openapi.json").get_data(), range(4)))
    assert len(set(documents)) == 1 and not api._pending_docs
    spec = app.test_client().get("/openapi.json").json
    assert {"/api/generate", "/generate", "/v1/images/generations", "/api/tasks/{task_id}"} <= set(spec["paths"])
    assert "DEFAULT_ERROR" in spec["components"]["responses"] and len(spec["tags"]) == 13
    with app.test_request_context():  # URL builders are compiled on first use, and build as werkzeug's own do
        assert url_for("web_assets", filename="a b/c.js") == "/ui/a%20b/c.js"
        assert url_for("swagger_assets", filename="x.css", v=2) == "/swagger-assets/x.css?v=2"
