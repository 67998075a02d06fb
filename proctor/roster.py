"""Roster CSV: the one set of rules for importing users, for the admin page, the API and `proctor users import`.

A header row names the columns, in any order: `username` (required), `full_name`, `role` (admin, teacher
or student; student when absent or empty) and `password` (checked like any password; one is generated when
absent or empty). Every row is checked before anyone is created, and a refused roster names the line of
each problem, so a file with a problem imports nobody (users that exist already are skipped by the callers,
which makes importing the same file twice harmless, also after a database error stopped one halfway).
"""

from __future__ import annotations

import collections
import csv
import io
from dataclasses import dataclass

from proctor.passwords import WeakPassword, check_strength
from proctor.storage import validate
from proctor.storage.base import InvalidData

COLUMNS = ("username", "full_name", "role", "password")
MAX_COLUMNS = 16  # a header wider than this is another kind of file (after trailing empty cells are dropped)
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
    try:
        header = [(name or "").strip().lower() for name in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise RosterError([f"line 1: not CSV: {exc}"]) from None
    while header and not header[-1]:
        header.pop()  # spreadsheets end lines with empty cells
    problems = _header_problems(header)
    if problems:
        raise RosterError(problems)
    reader.fieldnames = header
    rows: list[RosterRow] = []
    first_line: dict[str, int] = {}  # lower-cased username -> its line
    try:
        for record in reader:
            line = reader.line_num
            extra = record.pop(None, None)  # DictReader puts cells beyond the header under the key None
            if extra and any(cell.strip() for cell in extra):
                problems.append(f"line {line}: {len(header) + len(extra)} cells, the header has {len(header)}")
                continue
            _add_row(line, record, rows, first_line, problems)
    except csv.Error as exc:  # an unclosed quote running past the csv module's field limit, a NUL byte
        problems.append(f"line {reader.line_num}: not CSV: {exc} (an unclosed quote?)")
    if max_rows is not None and len(rows) > max_rows:
        problems.append(f"{len(rows)} users: at most {max_rows} per import (split the file)")
    if not rows and not problems:
        problems.append("no users after the header row")
    if problems:
        raise RosterError(problems)
    return rows


def _add_row(line: int, record: dict[str, str | None], rows: list[RosterRow], first_line: dict[str, int],
             problems: list[str]) -> None:
    """Check one record and add it to `rows`, or its problem to `problems`."""
    cells = {name: value or "" for name, value in record.items()}
    if not any(value.strip() for value in cells.values()):
        return  # a blank line, or one of commas only (spreadsheets write those)
    try:
        row = _row(line, cells)
    except InvalidData as exc:
        problems.append(f"line {line}: {exc}")
        return
    # Logins are case-sensitive, but "Ann" and "ann" in one roster is a typo, not two people.
    earlier = first_line.setdefault(row.username.lower(), line)
    if earlier != line:
        problems.append(f"line {line}: username {row.username!r} is also on line {earlier}")
        return
    rows.append(row)


def _header_problems(header: list[str]) -> list[str]:
    if not header:
        return ["line 1: empty: the first line must name the columns, e.g. username,full_name,role"]
    if len(header) > MAX_COLUMNS:  # another kind of file picked by mistake: say so, not what each cell is
        return [f"line 1: {len(header)} columns; a roster has at most {len(COLUMNS)} "
                f"({', '.join(COLUMNS)})"]
    problems = []
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        problems.append(f"line 1: unknown column(s) {', '.join(repr(n[:40]) for n in unknown)} "
                        f"(the columns are {', '.join(COLUMNS)})")
    twice = sorted(name for name, count in collections.Counter(header).items() if count > 1)
    if twice:
        problems.append(f"line 1: column(s) {', '.join(repr(n) for n in twice)} named twice")
    if "username" not in header:
        problems.append("line 1: no 'username' column (the columns are username, and optionally full_name, "
                        "role, password)")
    return problems


def _row(line: int, cells: dict[str, str]) -> RosterRow:
    username = validate.username(cells.get("username", "").strip())
    full_name = cells.get("full_name", "").strip()
    if any(ord(c) < 32 or c == "\x7f" for c in full_name):
        # A line break in a name is an unclosed quote that swallowed the rows after it, not a name.
        raise InvalidData(f"full name of {username!r} has a line break or control character "
                          "(an unclosed quote on this line?)")
    validate.full_name(full_name)
    role = validate.role(cells.get("role", "").strip().lower() or "student")
    password = cells.get("password") or None
    if password is not None:
        if password != password.strip():
            raise InvalidData(f"password of {username!r} starts or ends with a space: nobody would type it")
        try:
            check_strength(password)
        except WeakPassword as exc:
            raise InvalidData(f"password of {username!r}: {exc}") from None
    return RosterRow(line, username, full_name, role, password)
