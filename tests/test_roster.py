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
    text = 'username,full_name\nann,"Ann\nAnders"\n\n,\nbad name,B\n'
    with pytest.raises(RosterError) as caught:
        parse_roster(text)
    # The quoted cell spans lines 2-3, the blank and comma-only lines are 4-5: the bad row is line 6.
    assert caught.value.problems == ["line 6: invalid username 'bad name': 1-64 letters, digits or . _ @ -, "
                                     "starting with a letter or digit"]
    assert parse_roster(text.replace("bad name", "cid"))[0].full_name == "Ann\nAnders"


@pytest.mark.parametrize("text, problem", [
    ("", "line 1: empty"),
    ("user,full_name\nann,A\n", "line 1: unknown column(s) 'user'"),
    ("username,fullname\nann,A\n", "line 1: unknown column(s) 'fullname'"),
    ("username,Username\nann,ann\n", "line 1: column(s) 'username' named twice"),
    ("full_name\nAnn\n", "line 1: no 'username' column"),
    ("username\n", "no users after the header row"),
    ("username,role\nann,janitor\n", "line 2: invalid role 'janitor'"),
    ("username,role\nann,student,extra\n", "line 2: 3 cells, the header has 2"),
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
