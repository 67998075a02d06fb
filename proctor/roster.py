"""Roster CSV: the one set of rules for importing users, for the admin page, the API and `proctor users import`.

A header row names the columns, in any order: `username` (required), `full_name`, `role` (admin, teacher
or student; student when absent or empty) and `password` (checked like any password; one is generated when
absent or empty). Every row is checked before anyone is created, and a refused roster names the line of
each problem, so a file is either imported whole or not at all (users that exist already are skipped by
the callers, which makes importing the same file twice harmless).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from proctor.passwords import WeakPassword, check_strength
from proctor.storage import validate
from proctor.storage.base import InvalidData

COLUMNS = ("username", "full_name", "role", "password")
MAX_FULL_NAME = 200
# Problems listed in a refusal: enough to fix a file in one go, not a wall of text for a wrong file.
MAX_LISTED = 20


class RosterError(ValueError):
    """The roster is refused; `problems` are the messages, each naming its line where there is one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        listed = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            listed.append(f"... and {len(problems) - MAX_LISTED} more")
        super().__init__("\n".join(listed))


@dataclass(frozen=True)
class RosterRow:
    line: int  # the file's line where the row ends (a quoted cell may span lines)
    username: str
    full_name: str
    role: str
    password: str | None  # None: the caller generates one


def parse_roster(text: str, max_rows: int | None = None) -> list[RosterRow]:
    """The roster's rows, all checked; raises RosterError listing every problem found."""
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    header = [(name or "").strip().lower() for name in (reader.fieldnames or [])]
    problems = _header_problems(header)
    if problems:
        raise RosterError(problems)
    reader.fieldnames = header
    rows: list[RosterRow] = []
    first_line: dict[str, int] = {}  # lower-cased username -> its line
    for record in reader:
        line = reader.line_num
        if None in record:  # DictReader puts cells beyond the header under the key None
            problems.append(f"line {line}: {len(header) + len(record[None])} cells, the header has {len(header)}")
            continue
        cells = {name: (value or "").strip() for name, value in record.items()}
        if not any(cells.values()):
            continue  # a blank line, or one of commas only (spreadsheets write those)
        try:
            row = _row(line, cells)
        except InvalidData as exc:
            problems.append(f"line {line}: {exc}")
            continue
        # Logins are case-sensitive, but "Ann" and "ann" in one roster is a typo, not two people.
        earlier = first_line.setdefault(row.username.lower(), line)
        if earlier != line:
            problems.append(f"line {line}: username {row.username!r} is also on line {earlier}")
            continue
        rows.append(row)
    if max_rows is not None and len(rows) > max_rows:
        problems.append(f"{len(rows)} users: at most {max_rows} per import (split the file)")
    if not rows and not problems:
        problems.append("no users after the header row")
    if problems:
        raise RosterError(problems)
    return rows


def _header_problems(header: list[str]) -> list[str]:
    if not header:
        return ["line 1: empty: the first line must name the columns, e.g. username,full_name,role"]
    problems = []
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        problems.append(f"line 1: unknown column(s) {', '.join(repr(n) for n in unknown)} "
                        f"(the columns are {', '.join(COLUMNS)})")
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        problems.append(f"line 1: column(s) {', '.join(repr(n) for n in twice)} named twice")
    if "username" not in header:
        problems.append("line 1: no 'username' column (the columns are username, and optionally full_name, "
                        "role, password)")
    return problems


def _row(line: int, cells: dict[str, str]) -> RosterRow:
    username = validate.username(cells.get("username", ""))
    full_name = validate.text("full name", cells.get("full_name", ""), max_length=MAX_FULL_NAME, allow_empty=True)
    role = validate.role(cells.get("role", "").lower() or "student")
    password = cells.get("password") or None
    if password is not None:
        try:
            check_strength(password)
        except WeakPassword as exc:
            raise InvalidData(f"password of {username!r}: {exc}") from None
    return RosterRow(line, username, full_name, role, password)
