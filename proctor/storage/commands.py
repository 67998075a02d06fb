"""`proctor init`, `proctor users ...` and `proctor purge`: the database from the command line."""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import logging
import os
import re
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from proctor import config as config_module
from proctor.cli import CommandError
from proctor.passwords import WeakPassword, check_strength, generate_password, hash_password
from proctor.roster import RosterError, RosterRow, parse_roster
from proctor.storage import open_store, sqlite_path
from proctor.storage.base import ROLES, Conflict, NotFound, Store, StoreError

logger = logging.getLogger(__name__)

_AGE = re.compile(r"^(\d+)([hdw])$")
_AGE_UNITS = {"h": "hours", "d": "days", "w": "weeks"}


def register(subparsers: argparse._SubParsersAction) -> None:
    init = subparsers.add_parser("init", help="create or upgrade the database schema and the first admin")
    _database_flag(init)
    init.add_argument("--admin-username", default="admin", help="name of the first admin (default admin)")
    init.add_argument("--admin-password", default=None,
                      help="the first admin's password (env PROCTOR_ADMIN_PASSWORD; generated and printed "
                           "once when neither is given)")
    init.set_defaults(func=_sync(_init))

    users = subparsers.add_parser("users", help="add, list, deactivate or import users")
    actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add one user (password generated and printed when not given)")
    _database_flag(add)
    add.add_argument("username")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--full-name", default="")
    add.add_argument("--password", default=None)
    add.set_defaults(func=_sync(_users_add))
    listing = actions.add_parser("list", help="list users")
    _database_flag(listing)
    listing.add_argument("--role", choices=ROLES, default=None)
    listing.set_defaults(func=_sync(_users_list))
    deactivate = actions.add_parser("deactivate", help="stop a user from logging in (the data stays)")
    _database_flag(deactivate)
    deactivate.add_argument("username")
    deactivate.set_defaults(func=_sync(_users_deactivate))
    imp = actions.add_parser("import", help="add users from a CSV roster (columns username and optionally "
                                            "full_name, role, password); prints the generated passwords")
    _database_flag(imp)
    imp.add_argument("roster", type=Path)
    imp.set_defaults(func=_sync(_users_import))

    purge = subparsers.add_parser("purge", help="delete evidence and events of exams ended long ago")
    _database_flag(purge)
    purge.add_argument("--older-than", required=True, metavar="AGE",
                       help="exams ended more than AGE ago: Nh, Nd or Nw (e.g. 30d)")
    purge.set_defaults(func=_sync(_purge))


def _database_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", default=None, metavar="URL",
                        help="sqlite:///path or postgresql://... (env PROCTOR_DATABASE_URL; "
                             f"default {config_module.Config.database_url})")


def _sync(command: Callable[[argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return asyncio.run(command(args))
    run.__name__ = command.__name__
    return run


def _database_url(args: argparse.Namespace) -> str:
    try:
        return config_module.from_sources(argparse.Namespace(database_url=args.database_url)).database_url
    except config_module.ConfigError as exc:
        raise CommandError(str(exc)) from None


async def open_initialised(url: str) -> Store:
    """The store at `url`, refused unless `proctor init` made it and its schema is current.

    A command must never create or migrate a database by itself: a mistyped --database-url would
    otherwise get an empty SQLite file (and report success into it), and a shared PostgreSQL
    database would be migrated under servers of the older version.
    """
    if url.startswith("sqlite:///") and not sqlite_path(url).exists():
        raise CommandError(f"no database at {sqlite_path(url)}: run `proctor init` first")
    store = await _open(url)
    try:
        if await store.pending_migrations():
            raise CommandError(f"the database at {_redacted(url)} is not initialised or is out of date: "
                               "run `proctor init` first")
    except BaseException:
        await store.close()
        raise
    return store


async def _open(url: str) -> Store:
    try:
        return await open_store(url)
    except StoreError as exc:
        raise CommandError(str(exc)) from None


@asynccontextmanager
async def _store(args: argparse.Namespace, *, migrate: bool = False) -> AsyncIterator[Store]:
    """Open the store; every StoreError inside becomes a CommandError with the store's message."""
    url = _database_url(args)
    store = await (_open(url) if migrate else open_initialised(url))
    try:
        if migrate:
            applied = await store.migrate()
            print(f"schema: applied migration(s) {', '.join(map(str, applied))}" if applied
                  else "schema: up to date")
        yield store
    except StoreError as exc:
        raise CommandError(str(exc)) from None
    finally:
        await store.close()


def _redacted(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _chosen_password(given: str | None, what: str) -> tuple[str, bool]:
    """(password, generated): a given one must pass the strength check, else one is generated."""
    if given is None:
        return generate_password(), True
    try:
        check_strength(given)
    except WeakPassword as exc:
        raise CommandError(f"{what}: {exc}") from None
    return given, False


# init ------------------------------------------------------------------------------------------------

async def _init(args: argparse.Namespace) -> int:
    async with _store(args, migrate=True) as store:
        admins = [u for u in await store.list_users("admin") if u.active]
        given = args.admin_password or os.environ.get("PROCTOR_ADMIN_PASSWORD") or None
        if admins:
            print(f"admin: {', '.join(u.username for u in admins)} already exist(s); no admin created")
            if given:
                print("note: the admin password given was NOT applied (the admin exists already)",
                      file=sys.stderr)
        else:
            password, generated = _chosen_password(given, "admin password")
            try:
                admin = await store.create_user(args.admin_username, "Administrator", "admin",
                                                hash_password(password))
            except Conflict:
                raise CommandError(f"user {args.admin_username!r} exists but is not an active admin: "
                                   "choose another --admin-username") from None
            await store.audit(None, "user_added", admin.username, {"role": "admin", "by": "init"})
            if generated:
                print(f"created admin {admin.username!r} with password: {password}")
                print("  (shown only this once: store it safely, or set a new one with "
                      "--admin-password next time on a fresh database)")
            else:
                print(f"created admin {admin.username!r} with the password given")
        await register_demo_heads(store)
    return 0


async def register_demo_heads(store: Store) -> None:
    """Add the demo heads the package ships to an empty store (idempotent: init runs on every `make run`)."""
    from proctor.models.demo import register_demo_heads as add_demo_heads  # torch: only when init runs

    await add_demo_heads(store)


# users -----------------------------------------------------------------------------------------------

async def _users_add(args: argparse.Namespace) -> int:
    password, generated = _chosen_password(args.password, f"password of {args.username!r}")
    async with _store(args) as store:
        try:
            # No full name given: the username stands in, as on the admin page and in roster imports.
            user = await store.create_user(args.username, args.full_name.strip() or args.username, args.role,
                                           hash_password(password))
        except Conflict:
            raise CommandError(f"username {args.username!r} already exists") from None
        await store.audit(None, "user_added", user.username, {"role": user.role, "by": "cli"})
    print(f"added {user.role} {user.username!r}" + (f" with password: {password}" if generated else ""))
    return 0


async def _users_list(args: argparse.Namespace) -> int:
    async with _store(args) as store:
        users = await store.list_users(args.role)
    rows = [("USERNAME", "ROLE", "ACTIVE", "FULL NAME")]
    rows += [(u.username, u.role, "yes" if u.active else "no", u.full_name) for u in users]
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:<{width[2]}}  {r[3]}".rstrip())
    return 0


async def _users_deactivate(args: argparse.Namespace) -> int:
    async with _store(args) as store:
        try:
            user = await store.get_user_by_name(args.username)
        except NotFound as exc:
            raise CommandError(str(exc)) from None
        if user.role == "admin" and user.active:
            others = [u for u in await store.list_users("admin") if u.active and u.id != user.id]
            if not others:
                raise CommandError(f"{user.username!r} is the last active admin: add another admin first")
        await store.set_user_active(user.id, False)
        await store.audit(None, "user_deactivated", user.username, {"by": "cli"})
    print(f"deactivated {user.username!r}")
    return 0


def _read_roster(path: Path) -> list[RosterRow]:
    """The roster's rows under proctor.roster's rules; every problem is reported with the file and line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise CommandError(f"cannot read roster {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CommandError(f"roster {str(path)!r} is not UTF-8 text: {exc}") from None
    try:
        return parse_roster(text)
    except RosterError as exc:
        problems = "\n".join(f"{path}: {problem}" for problem in str(exc).splitlines())
        raise CommandError("roster refused, no user was added:\n" + problems) from None


async def _users_import(args: argparse.Namespace) -> int:
    rows = _read_roster(args.roster)
    async with _store(args) as store:
        # "Ann" in a roster when "ann" exists is her, not a second account (see proctor.roster).
        existing = {u.username.lower(): u.username for u in await store.list_users()}
        # The passwords are shown this once, as CSV, so they can be printed or mailed to each user. Each row
        # goes out as soon as its user exists: if the database fails halfway, the users made so far keep
        # their passwords (a rerun skips them as existing and could never show them again).
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(("username", "full_name", "role", "password"))
        created = 0
        for row in rows:
            if row.username.lower() in existing:
                print(f"{args.roster}: line {row.line}: {existing[row.username.lower()]!r} exists already, skipped",
                      file=sys.stderr)
                continue
            # A password from the roster is not repeated: the column is for the generated ones.
            password = row.password or generate_password()
            full_name = row.full_name or row.username
            await store.create_user(row.username, full_name, row.role, hash_password(password))
            out.writerow((row.username, full_name, row.role, "" if row.password else password))
            sys.stdout.flush()
            created += 1
        await store.audit(None, "users_imported", str(args.roster), {"added": created})
    print(f"imported {created} user(s), skipped {len(rows) - created}", file=sys.stderr)
    return 0


# purge -----------------------------------------------------------------------------------------------

def parse_age(text: str) -> dt.timedelta:
    """'30d', '12h', '2w' -> timedelta."""
    match = _AGE.match(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise CommandError(f"invalid --older-than {text!r}: use a positive number followed by h, d or w "
                           "(e.g. 30d)")
    return dt.timedelta(**{_AGE_UNITS[match.group(2)]: int(match.group(1))})


async def _purge(args: argparse.Namespace) -> int:
    age = parse_age(args.older_than)
    async with _store(args) as store:
        report = await store.purge(age)
    print(f"purged exams ended more than {args.older_than} ago: {report.exams} exam(s), "
          f"{report.alerts} alert(s) with evidence, {report.events} session event(s), "
          f"{report.samples} training sample(s) made from their alerts")
    return 0
