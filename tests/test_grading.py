"""Grading a class: synthetic submissions that pass, fail, loop, kill their kernel, raise
everywhere, are not JSON, or delete their working directory — all graded, none fatal."""

import csv
import io
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest

from pedaPEFT import progress
from pedaPEFT.__main__ import main
from pedaPEFT.exercise_bank import lesson01

RIGHT = lesson01._break_even_rank()
RECORD = 'progress.record("{}", "{}", "hint {}")'


def notebook(first: str, *cells: str) -> str:
    book = nbformat.v4.new_notebook()
    book.cells = [nbformat.v4.new_code_cell(source) for source in (first, *cells)]
    return nbformat.writes(book)


def light(*cells: str) -> str:
    """A notebook that records results as a check would, without importing torch (fast)."""
    return notebook("from pedaPEFT import progress", *cells)


HOSTILE = {
    "bob/01_matrix_rank.ipynb": light("while True:\n    pass",
                                      RECORD.format("01-rref", "failed", "bob")),
    "carol/01_matrix_rank.ipynb": light(RECORD.format("01-rref", "passed", ""),
                                        "import os\nos._exit(1)",
                                        RECORD.format("01-break-even-rank", "passed", "")),
    "dave/01_matrix_rank.ipynb": light(*(f"raise ValueError({n})" for n in range(3)),
                                       RECORD.format("01-rref", "stub", "dave")),
    "erin/01_matrix_rank.ipynb": '{"cells": [ not json',
    "frank/01_matrix_rank.ipynb": light(
        "import os, shutil\nfor p in os.listdir('.'):\n"
        "    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)",
        RECORD.format("01-rref", "passed", "")),
}
# Ignores the interrupt sent at the cell timeout, so only the notebook timeout ends it.
STUCK = {"grace_01_matrix_rank.ipynb": light(
    RECORD.format("01-rref", "passed", ""),
    "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "while True:\n    time.sleep(0.1)")}
CELL_TIMEOUT_S = "3"  # the endless cells are interrupted after this
# Generous: these notebooks end by themselves, however slowly their kernels start.
HOSTILE_NOTEBOOK_TIMEOUT_S = "300"
# The stuck notebook always runs this long: room for its kernel to start and run one cell.
STUCK_NOTEBOOK_TIMEOUT_S = "25"


def write(root, submissions):
    for name, text in submissions.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def rows_of(out):
    rows = csv.DictReader(io.StringIO(out.read_text(encoding="utf-8")))
    return {(row["student"], row["exercise"]): row for row in rows}


def grade_class(root, submissions, notebook_timeout):
    """Grade ``submissions`` (written under ``root``); return (exit code, submissions dir,
    gradebook path, gradebook rows)."""
    write(root / "in", submissions)
    out = root / "book" / "gradebook.csv"
    code = main(["grade", str(root / "in"), "--out", str(out), "--cell-timeout", CELL_TIMEOUT_S,
                 "--notebook-timeout", notebook_timeout])
    return code, root / "in", out, rows_of(out)


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Both classes graded at once, with the instructor's own progress file set: the stuck
    notebook mostly sleeps until its timeout, so it runs alongside the hostile ones."""
    roots = {name: tmp_path_factory.mktemp(name) for name in ("hostile", "stuck", "instructor")}
    instructor = roots["instructor"] / "progress.json"
    patch = pytest.MonkeyPatch()
    patch.setenv(progress.ENV_VARIABLE, str(instructor))
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            stuck = pool.submit(grade_class, roots["stuck"], STUCK, STUCK_NOTEBOOK_TIMEOUT_S)
            hostile = grade_class(roots["hostile"], HOSTILE, HOSTILE_NOTEBOOK_TIMEOUT_S)
            return {"hostile": hostile, "stuck": stuck.result(), "instructor": instructor}
    finally:
        patch.undo()


@pytest.fixture(scope="module")
def hostile(graded):
    return graded["hostile"]


@pytest.fixture(scope="module")
def stuck(graded):
    return graded["stuck"]


def test_right_and_wrong_answers_get_their_results_and_hints(tmp_path):
    write(tmp_path / "in", {"alice/01_matrix_rank.ipynb": notebook(
        "from pedaPEFT import exercises",
        f'exercises.check("01-break-even-rank", {RIGHT})',
        "def rank_factorization(A):\n    return A, A",
        'exercises.check("01-rank-factorization", rank_factorization)')})
    out = tmp_path / "gradebook.csv"
    assert main(["grade", str(tmp_path / "in"), "--out", str(out)]) == 0
    rows = rows_of(out)
    assert set(rows) == {("alice", "01-break-even-rank"), ("alice", "01-rank-factorization")}
    assert rows["alice", "01-break-even-rank"]["result"] == "passed"
    assert rows["alice", "01-rank-factorization"]["result"] == "failed"
    assert "C has" in rows["alice", "01-rank-factorization"]["hint"]
    summary = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| alice | 01_matrix_rank.ipynb | ran | 1/2 |" in summary


def test_grading_survives_every_hostile_notebook(hostile, stuck):
    for code, _, out, _ in (hostile, stuck):
        assert code == 0 and out.with_suffix(".md").exists()
    assert {student for student, _ in hostile[3]} == {"bob", "carol", "dave", "erin", "frank"}
    assert {student for student, _ in stuck[3]} == {"grace_01_matrix_rank"}


def test_an_endless_cell_is_interrupted_and_the_next_cells_run(hostile):
    row = hostile[3]["bob", "01-rref"]
    assert (row["run"], row["result"], row["hint"]) == ("ran", "failed", "hint bob")


def test_a_killed_kernel_keeps_what_was_recorded_before(hostile):
    rows = hostile[3]
    assert rows["carol", "01-rref"]["result"] == "passed"
    assert rows["carol", "01-break-even-rank"]["result"] == "not run"
    assert rows["carol", "01-rref"]["run"] == "kernel died"


def test_errors_in_every_cell_do_not_stop_the_run(hostile):
    assert hostile[3]["dave", "01-rref"]["result"] == "not attempted"


def test_not_json_is_unreadable_and_graded_on_its_lesson(hostile):
    row = hostile[3]["erin", "01-rref"]
    assert (row["run"], row["result"]) == ("unreadable", "not run")


def test_deleting_the_working_copy_harms_nothing(hostile):
    _, root, _, rows = hostile
    assert rows["frank", "01-rref"]["result"] == "passed"
    assert (root / "frank" / "01_matrix_rank.ipynb").exists()


def test_a_notebook_that_ignores_interrupts_is_killed_at_its_timeout(stuck):
    row = stuck[3]["grace_01_matrix_rank", "01-rref"]
    assert (row["run"], row["result"]) == ("timed out", "passed")


def test_the_instructors_progress_is_untouched(graded):
    assert not graded["instructor"].exists()


def test_a_missing_directory_is_a_user_error(tmp_path, capsys):
    assert main(["grade", str(tmp_path / "nope")]) == 2
    assert "submissions_dir" in capsys.readouterr().err
