"""The roster CSV rules shared by the admin page, the API and `proctor users import`."""

import pytest

from proctor.roster import MAX_LISTED, RosterError, RosterRow, parse_roster


def test_columns_in_any_order_with_defaults():
    rows = parse_roster("\ufeffRole , Username,full_name,password\n"
                        "teacher,alice,Alice Martin,\n"
                        ",sam,,Correct-Horse-42\n")
    assert rows == [RosterRow(2, "alice", "Alice Martin", "teacher", None),
                    RosterRow(3, "sam", "", "student", "Correct-Horse-42")]


def test_username_alone_is_a_roster():
    assert [r.username for r in parse_roster("username\nann\nbob\n")] == ["ann", "bob"]


def test_blank_lines_and_comma_only_lines_are_skipped_and_line_numbers_follow_the_file():
    text = 'username,full_name\nann,"Ann, A."\n\n,\nbad name,B\n'
    with pytest.raises(RosterError) as caught:
        parse_roster(text)
    assert caught.value.problems == ["line 5: invalid username 'bad name': 1-64 letters, digits or . _ @ -, "
                                     "starting with a letter or digit"]
    assert parse_roster(text.replace("bad name", "cid"))[0].full_name == "Ann, A."


def test_an_unclosed_quote_is_refused_not_swallowing_the_rows_after_it():
    # Before: one user 'ann' named 'Ann Smith\nbob,Bob\n', and bob never created.
    with pytest.raises(RosterError, match="line 3: full name of 'ann' has a line break"):
        parse_roster('username,full_name\nann,"Ann Smith\nbob,Bob\n')
    # Past the csv module's field limit it raised csv.Error: a 500 on the web, a traceback from the CLI.
    with pytest.raises(RosterError, match="not CSV: .*an unclosed quote"):
        parse_roster('username,full_name\nann,"Ann Smith\n' + "".join(f"u{i},User {i}\n" for i in range(20000)))


def test_trailing_empty_cells_from_spreadsheets_are_accepted():
    rows = parse_roster("username,full_name,,\nann,Ann,,\nbob,Bob\n")
    assert [(r.username, r.full_name) for r in rows] == [("ann", "Ann"), ("bob", "Bob")]
    with pytest.raises(RosterError, match="line 2: 3 cells, the header has 2"):
        parse_roster("username,full_name\nann,Ann,student\n")


def test_a_wide_header_is_refused_at_once():
    # Another kind of file picked by mistake (one line of thousands of cells): counting duplicate names cell
    # by cell took 15 s for 40,000 cells on the event loop.
    with pytest.raises(RosterError) as caught:
        parse_roster(",".join(f"c{i}" for i in range(200_000)) + "\n")
    assert caught.value.problems == ["line 1: 200000 columns; a roster has at most 4 (username, full_name, role, "
                                     "password)"]


@pytest.mark.parametrize("text, problem", [
    ("", "line 1: empty"),
    ("user,full_name\nann,A\n", "line 1: unknown column(s) 'user'"),
    ("username,fullname\nann,A\n", "line 1: unknown column(s) 'fullname'"),
    ("username,Username\nann,ann\n", "line 1: column(s) 'username' named twice"),
    ("full_name\nAnn\n", "line 1: no 'username' column"),
    ("username\n", "no users after the header row"),
    ("username,role\nann,janitor\n", "line 2: invalid role 'janitor'"),
    ("username,role\nann,student,extra\n", "line 2: 3 cells, the header has 2"),
    ("username,password\nann, Correct-Horse-42\n", "line 2: password of 'ann' starts or ends with a space"),
    ("username\nann\nANN\n", "line 3: username 'ANN' is also on line 2"),
    ("username,password\nann,admin\n", "line 2: password of 'ann': password"),
    ("username,full_name\nann," + "x" * 201 + "\n", "line 2: full name is too long"),
])
def test_problems_name_their_line(text, problem):
    with pytest.raises(RosterError) as caught:
        parse_roster(text)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_every_problem_is_found_and_the_message_lists_the_first_ones():
    text = "username\n" + "".join(f"bad name {i}\n" for i in range(MAX_LISTED + 5))
    with pytest.raises(RosterError) as caught:
        parse_roster(text)
    assert len(caught.value.problems) == MAX_LISTED + 5
    lines = str(caught.value).splitlines()
    assert len(lines) == MAX_LISTED + 1 and lines[-1] == "... and 5 more"


def test_max_rows():
    text = "username\n" + "".join(f"user{i}\n" for i in range(11))
    assert len(parse_roster(text, max_rows=11)) == 11
    with pytest.raises(RosterError, match="11 users: at most 10 per import"):
        parse_roster(text, max_rows=10)
