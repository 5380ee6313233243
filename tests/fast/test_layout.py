"""The API's layout holds by construction: blueprints import the context, never the app module or each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mflux_server.api
import mflux_server.worker

API = Path(mflux_server.api.__file__).parent
WORKER = Path(mflux_server.worker.__file__).parent
BLUEPRINTS = ("generation", "tasks", "info")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, by its dotted name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_blueprints_import_neither_the_app_nor_another_blueprint():
    for name in BLUEPRINTS:
        imports = imported_modules(API / f"{name}.py")
        assert "mflux_server.api.context" in imports, f"{name} should reach db/settings through api.context"
        forbidden = {"mflux_server.api.app"} | {f"mflux_server.api.{other}" for other in BLUEPRINTS if other != name}
        assert not imports & forbidden, f"{name}.py imports {imports & forbidden}"


def test_nothing_but_the_store_runs_sql():
    root = API.parent
    for path in root.rglob("*.py"):
        # testing_postgres.py creates the test server's databases, not queue SQL.
        if (root / "store") in path.parents or path.name == "testing_postgres.py":
            continue
        assert ".execute(" not in path.read_text(), f"{path.relative_to(root)} runs SQL outside the store"
    for path in Path(mflux_server.worker.__file__).parent.rglob("*.py"):
        assert ".execute(" not in path.read_text(), f"{path} runs SQL outside the store"


def module_graph() -> dict[str, set[str]]:
    """Which of our modules each of our modules imports, at the top or inside a function."""
    roots = {"mflux_server": Path(mflux_server.api.__file__).parents[1], "mflux_server.worker": WORKER}
    files: dict[str, Path] = {}
    for package, folder in roots.items():
        for path in folder.rglob("*.py"):
            parts = [part for part in path.relative_to(folder).with_suffix("").parts if part != "__init__"]
            files[".".join([package, *parts])] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    edges.add(child if child in files else node.module)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {edge for edge in edges if edge in files and edge != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = module_graph()
    assert "mflux_server.store.base" in graph and graph["mflux_server.store.base"], "the graph was read"

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph[current])
        return False

    circles = sorted(f"{a} → {b}" for a, edges in graph.items() for b in edges if reaches(b, a))
    assert not circles, circles


def test_outside_the_store_code_asks_for_a_capability_never_for_a_database():
    package = Path(mflux_server.api.__file__).parents[1]
    asked = []
    for root in (package, WORKER):
        for path in root.rglob("*.py"):
            if (package / "store") in path.parents:
                continue
            text = path.read_text()
            if re.search(r"is_postgres|is_server_url|isinstance\([^)]*(Sqlite|Postgres)Store", text):
                asked.append(str(path.relative_to(root.parent)))
    assert not asked, f"these branch on the database's name; ask store.capabilities instead: {asked}"
