"""Grading a class: synthetic submissions that pass, fail, loop, kill their kernel, raise
everywhere, are not JSON, or delete their working directory — all graded, none fatal."""

import csv
import io

import nbformat
import pytest

from pedaPEFT import progress
from pedaPEFT.__main__ import main
from pedaPEFT.exercise_bank import lesson01

RIGHT = lesson01._break_even_rank()
CHECK = 'exercises.check("01-break-even-rank", {})'
RANK = 'exercises.check("01-rank-factorization", rank_factorization)'


def notebook(*cells: str) -> str:
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell("from pedaPEFT import exercises"),
                  *(nbformat.v4.new_code_cell(cell) for cell in cells)]
    return nbformat.writes(book)


SUBMISSIONS = {
    "alice/01_matrix_rank.ipynb": notebook(CHECK.format(RIGHT),
                                           "def rank_factorization(A):\n    return A, A", RANK),
    "bob/01_matrix_rank.ipynb": notebook("while True:\n    pass", CHECK.format(RIGHT - 7)),
    "carol/01_matrix_rank.ipynb": notebook(CHECK.format(RIGHT), "import os\nos._exit(1)", RANK),
    "dave/01_matrix_rank.ipynb": notebook(*(f"raise ValueError({n})" for n in range(3)),
                                          CHECK.format(...), RANK),
    "erin/01_matrix_rank.ipynb": '{"cells": [ not json',
    "frank/01_matrix_rank.ipynb": notebook(
        "import os, shutil\nfor p in os.listdir('.'):\n"
        "    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)", CHECK.format(RIGHT)),
    "grace.ipynb": notebook(CHECK.format(RIGHT),
                            "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                            "while True:\n    time.sleep(0.1)"),
}


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("submissions")
    for name, text in SUBMISSIONS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    instructor = tmp_path_factory.mktemp("instructor") / "progress.json"
    mp = pytest.MonkeyPatch()
    mp.setenv(progress.ENV_VARIABLE, str(instructor))
    out = root.parent / "book" / "gradebook.csv"
    code = main(["grade", str(root), "--out", str(out), "--cell-timeout", "3",
                 "--notebook-timeout", "40"])
    mp.undo()
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    return code, root, out, instructor, {(r["student"], r["exercise"]): r for r in rows}


def test_grading_finishes_and_writes_both_files(graded):
    code, _, out, _, rows = graded
    assert code == 0 and out.with_suffix(".md").exists()
    assert {student for student, _ in rows} == {"alice", "bob", "carol", "dave", "erin",
                                                 "frank", "grace"}


def test_right_and_wrong_answers_with_their_hints(graded):
    rows = graded[4]
    assert rows["alice", "01-break-even-rank"]["result"] == "passed"
    assert rows["alice", "01-rank-factorization"]["result"] == "failed"
    assert "C has" in rows["alice", "01-rank-factorization"]["hint"]
    assert str(RIGHT) not in rows["alice", "01-rank-factorization"]["hint"]


def test_an_endless_cell_is_interrupted_and_grading_goes_on(graded):
    row = graded[4]["bob", "01-break-even-rank"]
    assert row["result"] == "failed" and row["run"] == "ran"


def test_a_killed_kernel_keeps_what_was_checked_before(graded):
    rows = graded[4]
    assert rows["carol", "01-break-even-rank"]["result"] == "passed"
    assert rows["carol", "01-rank-factorization"]["result"] == "not run"
    assert rows["carol", "01-rank-factorization"]["run"] == "kernel died"


def test_errors_everywhere_and_stubs(graded):
    rows = graded[4]
    assert rows["dave", "01-break-even-rank"]["result"] == "not attempted"
    assert rows["dave", "01-rank-factorization"]["result"] == "failed"


def test_not_json_is_unreadable_and_graded_on_its_lesson(graded):
    rows = graded[4]
    assert rows["erin", "01-rref"]["run"] == "unreadable"
    assert rows["erin", "01-rref"]["result"] == "not run"


def test_deleting_the_working_copy_harms_nothing(graded):
    _, root, _, _, rows = graded
    assert rows["frank", "01-break-even-rank"]["result"] == "passed"
    assert (root / "frank" / "01_matrix_rank.ipynb").exists()


def test_a_notebook_that_ignores_interrupts_is_killed_at_its_timeout(graded):
    row = graded[4]["grace", "01-break-even-rank"]
    assert row["run"] == "timed out" and row["result"] == "passed"


def test_the_instructors_progress_is_untouched(graded):
    assert not graded[3].exists()


def test_a_missing_directory_is_a_user_error(tmp_path, capsys):
    assert main(["grade", str(tmp_path / "nope")]) == 2
    assert "submissions_dir" in capsys.readouterr().err
