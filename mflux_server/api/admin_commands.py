"""mflux-server keys …, backup and migrate-to: what an operator runs beside the server, on the same queue."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from mflux_server import store
from mflux_server.core import api_keys
from mflux_server.core.settings import default_db_path, env_name
from mflux_server.store import Conflict, Store, StoreError

COMMANDS = ("keys", "backup", "migrate-to")
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def key_name(text: str) -> str:
    """A key's name: 1 to 64 letters, digits, dots, dashes, underscores or @, starting with a letter or digit."""
    if not KEY_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: a name is 1 to 64 letters, digits, '.', '_', '-' or '@', "
                                         "starting with a letter or digit")
    return text


def _when(at: float | None) -> str:
    return "never" if at is None else datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def parser() -> argparse.ArgumentParser:
    """The commands, each with --db (the queue file, as for the server)."""
    import os

    top = argparse.ArgumentParser(prog="mflux-server", description="Manage API keys, back up the queue file, or "
                                  "move it to PostgreSQL.")
    default = os.environ.get(env_name("db")) or default_db_path()
    commands = top.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="create, list or revoke API keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; it is printed once, alone on the last line")
    create.add_argument("name", type=key_name)
    create.add_argument("--admin", action="store_true", help="sees and manages every task")
    create.add_argument("--priority", action="store_true", help="may submit priority tasks")
    actions.add_parser("list", help="names, rights, creation and last use (never the keys)")
    revoke = actions.add_parser("revoke", help="revoke a key at once, in every server process")
    revoke.add_argument("name")
    backup = commands.add_parser("backup", help="copy the queue file while it runs (SQLite's backup API)")
    backup.add_argument("path", type=Path)
    move = commands.add_parser("migrate-to", help="copy an SQLite queue (tasks, images, timing stats, keys, events, "
                               "webhooks, metrics) into an empty PostgreSQL database")
    move.add_argument("url", type=postgres_url, help="postgresql://user@host/dbname (migrated first if new)")
    for sub in (create, actions.choices["list"], revoke, backup, move):
        sub.add_argument("--db", default=default, help=f"the queue file (env {env_name('db')}; default {default})")
    return top


def postgres_url(text: str) -> str:
    """A postgresql:// (or postgres://) URL."""
    if store.capabilities_of(text).local_file:
        raise argparse.ArgumentTypeError(f"{text!r}: give a postgresql://user@host/dbname URL")
    return text


def run_migrate_to(url: str, source: Store) -> int:
    """Copy the SQLite queue into PostgreSQL; stop the server and workers first, so nothing changes meanwhile."""
    store.open_or_exit(url, "mflux-server")
    target = store.connect(url)
    started = time.monotonic()
    try:
        copied = target.copy_from(source)
    except (RuntimeError, StoreError) as error:
        print(f"mflux-server: cannot migrate to {store.redact(url)}: {error}", file=sys.stderr)
        return 1
    finally:
        target.close()
    for table, rows in copied.items():
        print(f"{table:16} {rows:>9,} rows")
    print(f"copied the queue to {store.redact(url)} in {time.monotonic() - started:.1f} s; "
          f"point MFLUX_SERVER_DB (or --db) of the server and every worker at it")
    return 0


def run_keys(args: argparse.Namespace, db: Store) -> int:
    """keys create | list | revoke."""
    if args.action == "create":
        key = api_keys.new_key()
        try:
            made = db.create_key(args.name, api_keys.key_hash(key), args.admin, args.priority)
        except Conflict:
            print(f"mflux-server: a key named {args.name!r} exists already (revoke it, or pick another name)",
                  file=sys.stderr)
            return 1
        rights = ", ".join(r for r, on in (("admin", made.admin), ("priority", made.priority)) if on) or "plain"
        print(f"created key {made.name!r} ({rights}); it is shown this once:")
        print(key)
        return 0
    if args.action == "list":
        print(f"{'name':24} {'rights':16} {'created':24} {'last used':24} state")
        for listed in db.list_keys():
            rights = ",".join(r for r, on in (("admin", listed.admin), ("priority", listed.priority)) if on) or "-"
            state = f"revoked {_when(listed.revoked_at)}" if listed.revoked_at else "live"
            print(f"{listed.name:24} {rights:16} {_when(listed.created_at):24} {_when(listed.last_used_at):24} {state}")
        return 0
    if not db.revoke_key(args.name):
        print(f"mflux-server: no live key named {args.name!r}", file=sys.stderr)
        return 1
    print(f"revoked {args.name!r}")
    return 0


def run_backup(target: Path, db: Store) -> int:
    """Copy the live queue into `target` with SQLite's online backup (consistent while both processes write)."""
    if target.exists():
        print(f"mflux-server: {target} exists; give a new path", file=sys.stderr)
        return 1
    started = time.monotonic()
    db.backup(target)
    print(f"backed up to {target} ({target.stat().st_size:,} bytes in {time.monotonic() - started:.1f} s)")
    return 0


def main(argv: Sequence[str]) -> int:
    """Run one command; exit 1 with one line when it cannot."""
    args = parser().parse_args(argv)
    if args.command in ("backup", "migrate-to") and not store.capabilities_of(args.db).local_file:
        print(f"mflux-server: {args.command} reads an SQLite queue file, and --db names a PostgreSQL one "
              "(back that up with pg_dump)", file=sys.stderr)
        return 1
    store.open_or_exit(args.db, "mflux-server")
    db = store.connect(args.db)
    try:
        if args.command == "migrate-to":
            return run_migrate_to(args.url, db)
        return run_keys(args, db) if args.command == "keys" else run_backup(args.path, db)
    finally:
        db.close()
