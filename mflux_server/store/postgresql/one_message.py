"""A lone write with its write lock in one network message, for the worker's claim between two generations.

psycopg's pipeline sends each statement of BEGIN, the lock, the write and COMMIT with a write of its own, and
the server wakes for each. Here both statements are bound to prepared statements and go out in one write with
one Sync; PostgreSQL runs what comes before a Sync as one implicit transaction, so the lock is held to its end.
A cold claim (after a 250 ms generation) took 1.9 ms through the pipeline and 1.1 ms this way (bench/
explanations.md "Two stores").
"""

from __future__ import annotations

import hashlib
import re
import select
import weakref
from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import pq
from psycopg.adapt import Transformer

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_prepared: weakref.WeakKeyDictionary[psycopg.Connection[Any], set[str]] = weakref.WeakKeyDictionary()


def positional(text: str) -> tuple[str, list[str]]:
    """The statement with psycopg's %(name)s placeholders as $1, $2…, and the names in that order."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return _PLACEHOLDER.sub(number, text).replace("%%", "%"), names


def _text(value: Any) -> bytes | None:
    """A parameter in PostgreSQL's text format (the server infers each type from where it is used)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, float):
        return repr(value).encode()
    if isinstance(value, (int, str)):
        return str(value).encode()
    raise TypeError(f"a one-message write takes text and numbers, not {type(value).__name__}")


def _prepare(session: psycopg.Connection[Any], text: str) -> str:
    """The name of the session's prepared statement for text, preparing it on first use."""
    name = "mflux_one_" + hashlib.sha1(text.encode()).hexdigest()[:16]
    known = _prepared.setdefault(session, set())
    if name not in known:
        # SQL PREPARE makes a protocol-level prepared statement; prepare=False so psycopg does not prepare the PREPARE.
        session.execute(f"PREPARE {name} AS {text}", prepare=False)
        known.add(name)
    return name


def _wait(pgconn: pq.abc.PGconn, readable: bool) -> None:
    # select() is what gevent patches too, should a server process ever call this.
    select.select([pgconn.socket] if readable else [], [] if readable else [pgconn.socket], [])


def _exchange(session: psycopg.Connection[Any], sends: list[tuple[str, str | None, list[bytes | None]]]
              ) -> list[pq.abc.PGresult]:
    """Send statements (prepared, by name; or plain, by text) with one Sync in one write; every result before it."""
    pgconn = session.pgconn
    pgconn.enter_pipeline_mode()
    try:
        for kind, name, values in sends:
            if kind == "prepared":
                pgconn.send_query_prepared(name.encode(), values)  # type: ignore[union-attr]
            else:
                pgconn.send_query_params(name.encode(), None)  # type: ignore[union-attr]
        pgconn.pipeline_sync()
        while pgconn.flush():
            _wait(pgconn, readable=False)
        results: list[pq.abc.PGresult] = []
        while True:
            _wait(pgconn, readable=True)
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    continue  # the end of one statement's results
                if result.status == pq.ExecStatus.PIPELINE_SYNC:
                    return results
                results.append(result)
    finally:
        if pgconn.status == pq.ConnStatus.OK:
            pgconn.exit_pipeline_mode()


def _run(session: psycopg.Connection[Any], lock: str, statement: str, parameters: Mapping[str, Any],
         rehearse: bool) -> pq.abc.PGresult:
    """The statement's result, its prepared statements made again once if psycopg dropped them all."""
    text, names = positional(statement)
    values = [_text(parameters[key]) for key in names]
    for attempt in (1, 2):
        sends: list[tuple[str, str | None, list[bytes | None]]] = [
            ("prepared", _prepare(session, lock), []), ("prepared", _prepare(session, text), values)]
        if rehearse:
            sends = [("plain", "BEGIN", []), *sends, ("plain", "ROLLBACK", [])]
        results = _exchange(session, sends)
        failed = [r for r in results if r.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)]
        if not failed:
            return results[-2] if rehearse else results[-1]
        error = psycopg.errors.error_from_result(failed[0], encoding=session.info.encoding)
        if rehearse and session.pgconn.transaction_status != pq.TransactionStatus.IDLE:
            session.pgconn.exec_(b"ROLLBACK")  # the failed rehearsal's transaction, out of psycopg's sight too
        if isinstance(error, psycopg.errors.InvalidSqlStatementName) and attempt == 1:
            # psycopg deallocates every prepared statement of a session it sees roll back: prepare ours again.
            _prepared.pop(session, None)
            continue
        raise error
    raise AssertionError("unreachable")


def write_alone(session: psycopg.Connection[Any], lock: str, statement: str, parameters: Mapping[str, Any]
                ) -> tuple[int, pq.abc.PGresult, list[tuple[Any, ...]]]:
    """Run lock then statement (psycopg dialect) as one transaction in one message: rowcount, result, rows."""
    found = _run(session, lock, statement, parameters, rehearse=False)
    loader = Transformer(session)
    loader.set_pgresult(found)
    rows = loader.load_rows(0, found.ntuples, tuple) if found.status == pq.ExecStatus.TUPLES_OK else []
    return int(found.command_tuples or 0), found, rows


def rehearse(session: psycopg.Connection[Any], lock: str, statement: str, parameters: Mapping[str, Any]) -> None:
    """Run lock and statement in a transaction that is rolled back, so the session has compiled and planned all
    they run (triggers included) and nothing changed.

    The ROLLBACK goes out here, not through psycopg, which would deallocate every statement the session prepared.
    """
    _run(session, lock, statement, parameters, rehearse=True)
