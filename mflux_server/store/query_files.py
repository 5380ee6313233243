"""The one loader of the stores' SQL files: named statements (`-- name:` and a description line), as aiosql writes them.

store/queries.sql holds the statements both databases run with the same text; each backend's own queries.sql the
ones whose text differs, written for that database. A backend's statements are the shared file and its own; a name
in both is an error, so every difference is one explicit entry in one file. (aiosql reads the same format, but
runs the statements itself: the stores need their own execution, pipelined and under a write lock.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

# The statements that change rows: on PostgreSQL one outside a transaction takes the write lock.
_WRITES = re.compile(r"\s*(?:INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Query:
    """One named statement with the line that says what it does, and whether it writes."""

    name: str
    description: str
    sql: str
    writes: bool = False


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
        sql = "\n".join(lines).strip().rstrip(";")
        named[name] = Query(name, " ".join(description), sql, bool(_WRITES.match(sql)))
    return named


def _read(package: str) -> dict[str, Query]:
    return parse_queries(resources.files(package).joinpath("queries.sql").read_text(encoding="utf-8"))


def shared() -> dict[str, Query]:
    """The statements both backends run as written."""
    return _read("mflux_server.store")


def own(backend: str) -> dict[str, Query]:
    """One backend's own statements ("sqlite" or "postgresql"), as written in its file."""
    return _read(f"mflux_server.store.{backend}")


@cache
def for_backend(backend: str, placeholders: Callable[[str], str] | None = None) -> dict[str, Query]:
    """A backend's statements, loaded once: the shared ones and its own, each name once, in the driver's
    placeholder style when the backend gives a conversion (psycopg's %(name)s for `:name`)."""
    common, specific = shared(), own(backend)
    both = sorted(set(common) & set(specific))
    if both:
        raise RuntimeError(f"{backend}/queries.sql repeats statements of store/queries.sql: {both}")
    merged = common | specific
    if placeholders is None:
        return merged
    return {name: Query(q.name, q.description, placeholders(q.sql), q.writes) for name, q in merged.items()}
