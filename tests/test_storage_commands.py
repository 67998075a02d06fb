"""`proctor init`, `users` and `purge` through the real command line (SQLite, and init on PostgreSQL)."""

from __future__ import annotations

import asyncio
import re

import pytest

import proctor.cli as cli
from proctor.passwords import verify_password
from proctor.storage import open_store
from proctor.storage.commands import parse_age


@pytest.fixture
def run(monkeypatch, tmp_path, capsys):
    """Run `proctor ARGS...` in a temporary directory; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROCTOR_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("PROCTOR_DATABASE_URL", raising=False)
    # Only this area's commands: the others are tested in their own files.
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("proctor.storage.commands",))

    def call(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return call


def users_in(url: str):
    async def read():
        store = await open_store(url)
        try:
            return {u.username: u for u in await store.list_users()}, await store.list_audit()
        finally:
            await store.close()
    return asyncio.run(read())


def test_init_twice_is_safe_and_prints_the_generated_password_once(run, tmp_path):
    code, out, _ = run("init")
    assert code == 0
    password = re.search(r"created admin 'admin' with password: (\S+)", out).group(1)
    assert len(password) >= 16
    code, out2, _ = run("init")
    assert code == 0 and "already exist" in out2 and password not in out2 and "password:" not in out2
    users, audit = users_in(f"sqlite:///{tmp_path}/var/proctor.db")
    assert list(users) == ["admin"] and users["admin"].role == "admin"
    assert verify_password(users["admin"].password_hash, password)
    assert not verify_password(users["admin"].password_hash, "admin")
    assert [a.action for a in audit] == ["user_added"]


def test_init_password_from_env_and_weak_ones_refused(run, monkeypatch, tmp_path):
    code, _, err = run("init", "--admin-password", "admin")
    assert code == 2 and "too short" in err
    monkeypatch.setenv("PROCTOR_ADMIN_PASSWORD", "a-long-enough-secret")
    code, out, _ = run("init", "--admin-username", "chief", "--database-url", "sqlite:///db/x.db")
    assert code == 0 and "a-long-enough-secret" not in out
    users, _ = users_in(f"sqlite:///{tmp_path}/db/x.db")
    assert verify_password(users["chief"].password_hash, "a-long-enough-secret")


@pytest.mark.postgres
def test_init_twice_on_postgres(run, postgres_server):
    url = asyncio.run(postgres_server.new_database())
    assert run("init", "--database-url", url)[0] == 0
    code, out, _ = run("init", "--database-url", url)
    assert code == 0 and "schema: up to date" in out
    assert list(users_in(url)[0]) == ["admin"]


def test_commands_refuse_an_uninitialised_database(run, tmp_path):
    code, _, err = run("users", "list")
    assert code == 2 and "run `proctor init` first" in err
    assert not (tmp_path / "var").exists()  # nothing was created by asking
    code, _, err = run("users", "list", "--database-url", "mysql://db")
    assert code == 2 and "invalid database_url='mysql://db'" in err


def test_users_add_list_deactivate(run):
    run("init")
    code, out, _ = run("users", "add", "bob", "--role", "student", "--full-name", "Bob B")
    assert code == 0 and re.search(r"added student 'bob' with password: \S{10,}", out)
    code, _, err = run("users", "add", "bob", "--role", "teacher", "--password", "a-good-password")
    assert code == 2 and "'bob' already exists" in err
    code, _, err = run("users", "add", "eve", "--role", "teacher", "--password", "short")
    assert code == 2 and "too short" in err
    code, _, err = run("users", "add", "bad name", "--role", "teacher")
    assert code == 2 and "invalid username 'bad name'" in err
    assert run("users", "deactivate", "bob")[0] == 0
    code, out, _ = run("users", "list")
    assert re.search(r"^bob\s+student\s+no\s+Bob B$", out, re.M)
    assert run("users", "add", "cid", "--role", "student")[0] == 0  # no full name: the username stands in
    assert re.search(r"^cid\s+student\s+yes\s+cid$", run("users", "list")[1], re.M)
    code, _, err = run("users", "deactivate", "nobody")
    assert code == 2 and "no user named 'nobody'" in err
    code, _, err = run("users", "deactivate", "admin")
    assert code == 2 and "last active admin" in err


def test_roster_import(run, tmp_path):
    run("init")
    good = tmp_path / "roster.csv"
    good.write_text("username,full_name,role\nann,\"Ann, A.\",student\ncid,Cid C,Teacher\n", encoding="utf-8")
    code, out, err = run("users", "import", str(good))
    assert code == 0 and "imported 2 user(s)" in err
    rows = out.strip().splitlines()
    assert rows[0] == "username,full_name,role,password"
    assert rows[1].startswith('ann,"Ann, A.",student,') and rows[2].startswith("cid,Cid C,teacher,")
    users, _ = users_in(f"sqlite:///{tmp_path}/var/proctor.db")
    assert verify_password(users["ann"].password_hash, rows[1].rsplit(",", 1)[1])
    code, _, err = run("users", "import", str(good))  # again: existing users are skipped
    assert code == 0 and "'ann' exists already, skipped" in err
    good.write_text("username\nANN\n", encoding="utf-8")  # ignoring case: no second account
    code, _, err = run("users", "import", str(good))
    assert code == 0 and "line 2: 'ann' exists already, skipped" in err


def test_roster_import_that_fails_halfway_still_shows_the_passwords_of_the_users_it_made(run, tmp_path,
                                                                                         monkeypatch):
    from proctor.storage.base import StoreUnavailable
    from proctor.storage.sqlite import SqliteStore

    run("init")
    roster = tmp_path / "roster.csv"
    roster.write_text("username,full_name,role\nann,Ann,student\nbob,Bob,student\ncid,Cid,student\n")
    real = SqliteStore.create_user

    async def fail_on_cid(self, username, *args, **kwargs):
        if username == "cid":
            raise StoreUnavailable("disk I/O error")
        return await real(self, username, *args, **kwargs)

    monkeypatch.setattr(SqliteStore, "create_user", fail_on_cid)
    code, out, err = run("users", "import", str(roster))
    assert code == 2 and "disk I/O error" in err
    # Before: nothing was printed, and a rerun would skip ann and bob as existing: their passwords lost.
    rows = out.strip().splitlines()
    assert [r.split(",")[0] for r in rows] == ["username", "ann", "bob"]
    users, _ = users_in(f"sqlite:///{tmp_path}/var/proctor.db")
    assert verify_password(users["bob"].password_hash, rows[2].rsplit(",", 1)[1])


@pytest.mark.parametrize("content, message", [
    ("name,role\nann,student\n", "line 1: unknown column.*'name'.*\n.*line 1: no 'username' column"),
    ("", "line 1: empty"),
    ("username,full_name,role\nann,A,student\nbad name,B,student\ndee,D,janitor\n",
     "line 3: invalid username 'bad name'.*\n.*line 4: invalid role 'janitor'"),
    ("username,full_name,role\nann,A,student\nAnn,A2,student\n", "line 3: username 'Ann' is also on line 2"),
    ("username,full_name,role\nann,A,student,extra\n", "line 2: 4 cells, the header has 3"),
    ("username,full_name,role\n", "no users after the header row"),
    ("username,password\nann,short\n", "line 2: password of 'ann':"),
])
def test_bad_rosters_name_the_line_and_add_nobody(run, tmp_path, content, message):
    run("init")
    roster = tmp_path / "bad.csv"
    roster.write_text(content, encoding="utf-8")
    code, _, err = run("users", "import", str(roster))
    assert code == 2 and re.search(message, err), err
    assert list(users_in(f"sqlite:///{tmp_path}/var/proctor.db")[0]) == ["admin"]


def test_roster_import_takes_columns_in_any_order_and_given_passwords(run, tmp_path):
    run("init")
    roster = tmp_path / "roster.csv"
    # Same rules as the admin page's import: any column order, role defaults to student, a password column.
    roster.write_text("Password,USERNAME\nCorrect-Horse-42,ann\n,bob\n", encoding="utf-8")
    code, out, err = run("users", "import", str(roster))
    assert code == 0 and "imported 2 user(s)" in err, err
    rows = out.strip().splitlines()
    assert rows[1] == "ann,ann,student,"  # the roster's password is not printed again
    assert rows[2].startswith("bob,bob,student,") and len(rows[2].rsplit(",", 1)[1]) >= 12
    users, _ = users_in(f"sqlite:///{tmp_path}/var/proctor.db")
    assert verify_password(users["ann"].password_hash, "Correct-Horse-42")
    assert users["ann"].role == "student" and users["ann"].full_name == "ann"


def test_roster_file_errors(run, tmp_path):
    run("init")
    code, _, err = run("users", "import", "missing.csv")
    assert code == 2 and "cannot read roster 'missing.csv'" in err
    (tmp_path / "latin1.csv").write_bytes("username,full_name,role\nj,Jos\xe9,student\n".encode("latin-1"))
    code, _, err = run("users", "import", "latin1.csv")
    assert code == 2 and "not UTF-8" in err


def test_purge_command(run, tmp_path):
    run("init")
    code, out, _ = run("purge", "--older-than", "30d")
    assert code == 0 and "0 exam(s), 0 alert(s)" in out
    code, _, err = run("purge", "--older-than", "30x")
    assert code == 2 and "invalid --older-than '30x'" in err
    _, audit = users_in(f"sqlite:///{tmp_path}/var/proctor.db")
    assert audit[0].action == "data_deleted"


@pytest.mark.parametrize("text, hours", [("12h", 12), ("30d", 720), ("2w", 336), (" 1d ", 24)])
def test_parse_age(text, hours):
    assert parse_age(text).total_seconds() == hours * 3600


@pytest.mark.parametrize("text", ["0d", "30", "d", "-1d", "1.5d", "1y"])
def test_parse_age_refuses(text):
    with pytest.raises(cli.CommandError, match="invalid --older-than"):
        parse_age(text)
