"""Documentation matches the code: every setting and endpoint is in the README and the OpenAPI spec."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from mflux_server.core.settings import Settings, env_name

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table_with_its_default():
    rows = {m.group(1): m.group(3) for m in re.finditer(r"^\| `--([a-z-]+)` \| `([A-Z_]+)` \| `([^`]*)` \|", README, re.M)}
    for f in fields(Settings):
        flag = f.name.replace("_", "-")
        assert flag in rows, f"--{flag} is missing from the README configuration table"
        assert f"`{env_name(f.name)}`" in README
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
            assert rows[flag] == str(default), f"--{flag}: README says {rows[flag]}, code says {default}"


def test_every_endpoint_is_in_the_readme_and_fully_described_in_the_spec(client):
    spec = client.get("/openapi.json").json
    for path, operations in spec["paths"].items():
        plain = re.sub(r"\{(\w+)\}", r"<\1>", path)
        if path.startswith("/api"):
            assert plain in README, f"{path} is not documented in the README"
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


def test_the_readme_family_table_matches_the_catalog():
    from mflux_server.core import catalog

    columns = ["text_to_image", "image_to_image", "edit", "inpaint", "negative_prompt", "guidance"]
    rows = {m.group(1): m.group(2).split(" | ")
            for m in re.finditer(r"^\| [^|]*\(`([a-z0-9.-]+)`\) \| (.*) \|$", README, re.M)}
    families = {info.family for info in catalog.models()}
    assert set(rows) == families, "every family has one row"
    for family, cells in rows.items():
        members = [info for info in catalog.models() if info.family == family]
        for column, cell in zip(columns, cells[2:], strict=True):
            said = {part.startswith("yes") for part in cell.split("/")}
            assert said == {getattr(info.capabilities, column) for info in members}, f"{family}: {column} says {cell}"
        references = {info.max_reference_images for info in members}
        assert cells[4] == ("–" if references == {0} else "yes, 1 image" if references == {1}
                            else f"yes, up to {max(references)} images"), family
