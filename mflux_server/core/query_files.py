"""The one loader of the SQL files: named statements (`-- name:` and a description line), as aiosql writes them.

queries.sql holds every statement; queries_pg.sql the PostgreSQL versions of those whose text differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources


@dataclass(frozen=True, slots=True)
class Query:
    """One named statement of queries.sql with the line that says what it does."""

    name: str
    description: str
    sql: str


def parse_queries(text: str) -> dict[str, Query]:
    """Split a queries file into named statements; each must have a description comment under its name."""
    named: dict[str, Query] = {}
    for block in re.split(r"^-- name: ", text, flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        name = name.strip()
        lines = body.strip().splitlines()
        description = []
        while lines and lines[0].startswith("--"):
            description.append(lines.pop(0).removeprefix("--").strip())
        if not description:
            raise ValueError(f"query {name!r} has no description under its name")
        if name in named:
            raise ValueError(f"query {name!r} is defined twice")
        named[name] = Query(name, " ".join(description), "\n".join(lines).strip().rstrip(";"))
    return named


def load(file_name: str) -> dict[str, Query]:
    """The named statements of one SQL file of this package."""
    return parse_queries(resources.files("mflux_server.core").joinpath(file_name).read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def queries() -> dict[str, Query]:
    """The named statements of queries.sql, loaded once."""
    return load("queries.sql")
