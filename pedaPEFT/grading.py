"""Grade a class: run every submitted student notebook and write a gradebook.

``grade(submissions_dir)`` finds the notebooks (``SUBMISSIONS/<student>/<lesson>.ipynb`` or
``SUBMISSIONS/<student>.ipynb``), runs each one top to bottom in a fresh kernel, in its own
temporary working copy, and reads what its ``exercises.check`` calls recorded: per exercise
*passed*, *failed* (with the hint the student got), *not attempted* (a stub) or *not run*
(the cell was never reached). The progress of a graded notebook goes to a throwaway file, never
to the instructor's.

Each notebook runs in a child process with a per-cell timeout (an endless cell is interrupted
and the next cells still run) and a per-notebook timeout (the child and its kernel are
killed). A notebook that is not valid JSON, kills its kernel, raises in every cell or deletes
the files of its working directory is graded for what it recorded before; the submissions
themselves are only read.

Grading runs the students' code with the rights of whoever runs it: for an untrusted class,
run it in a container or a throwaway account. A student's code can also forge its own
results (it runs in the same kernel as the checks); grading is a convenience, not an exam
proctor.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from pedaPEFT.files import atomic_write_text

CELL_TIMEOUT_S = 120
NOTEBOOK_TIMEOUT_S = 900
CHECK_CALL = re.compile(r"exercises\.check\(\s*[\"']([0-9]{2}-[\w-]+)[\"']")
LESSON_IN_NAME = re.compile(r"(?:^|[^0-9])([0-9]{2})_[A-Za-z]")  # 01_matrix_rank, bob_01_...
RESULTS = ("passed", "failed", "not attempted", "not run")
WORKER_EXIT = {3: "kernel died", 4: "could not start a kernel"}


@dataclass
class NotebookGrade:
    """What one submitted notebook earned: the run's status and a result per exercise."""

    student: str
    notebook: str
    status: str  # "ran", "timed out", "kernel died", "unreadable", ...
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (result, hint)

    @property
    def passed(self) -> int:
        return sum(result == "passed" for result, _ in self.results.values())


def find_submissions(directory: Path) -> list[tuple[str, Path]]:
    """``(student, notebook)`` pairs: a sub-folder per student, or one notebook per student."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"submissions_dir must be a directory, got {str(directory)!r}")
    found = []
    for path in sorted(directory.rglob("*.ipynb")):
        relative = path.relative_to(directory)
        if ".ipynb_checkpoints" in relative.parts or not path.is_file():
            continue
        found.append((relative.parts[0] if len(relative.parts) > 1 else path.stem, path))
    return found


def _exercise_ids(notebook_text: str | None, name: str) -> list[str]:
    """The exercises a notebook is graded on: its check calls, else its lesson's exercises."""
    from pedaPEFT.exercise_bank import EXERCISES

    ids = [ident for ident in dict.fromkeys(CHECK_CALL.findall(notebook_text or ""))
           if ident in EXERCISES]
    if not ids:
        lesson = LESSON_IN_NAME.search(name)
        ids = [ident for ident, exercise in EXERCISES.items()
               if lesson and exercise.lesson == int(lesson.group(1))]
    return ids


def _read_notebook(path: Path) -> tuple[nbformat.NotebookNode | None, str | None]:
    try:
        text = path.read_text(encoding="utf-8")
        notebook = nbformat.reads(text, as_version=4)
    except Exception:  # not JSON, not a notebook, not text: graded as unreadable
        return None, None
    sources = [cell.get("source", "") for cell in notebook.get("cells", [])
               if cell.get("cell_type") == "code"]
    return notebook, "\n".join(source for source in sources if isinstance(source, str))


def _run_worker(notebook_path: Path, workdir: Path, progress_file: Path, cell_timeout: float,
                notebook_timeout: float) -> str:
    """Run one notebook in a child process; return the run's status."""
    env = dict(os.environ, PEDAPEFT_PROGRESS_FILE=str(progress_file))
    command = [sys.executable, "-m", "pedaPEFT.grading", str(notebook_path), str(workdir),
               str(cell_timeout)]
    process = subprocess.Popen(command, env=env, cwd=workdir, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        code = process.wait(timeout=notebook_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "timed out"
    return "ran" if code == 0 else WORKER_EXIT.get(code, f"grader error (exit {code})")


def grade_notebook(student: str, path: Path, cell_timeout: float = CELL_TIMEOUT_S,
                   notebook_timeout: float = NOTEBOOK_TIMEOUT_S) -> NotebookGrade:
    """Run one submission in a temporary working copy and collect its exercise results."""
    from pedaPEFT import progress

    notebook, code = _read_notebook(path)
    ids = _exercise_ids(code, path.name)
    if notebook is None:
        return NotebookGrade(student, path.name, "unreadable",
                             {ident: ("not run", "") for ident in ids})
    with tempfile.TemporaryDirectory(prefix="pedapeft-grade-") as scratch:
        scratch = Path(scratch)
        workdir, private = scratch / "work", scratch / "grader"
        workdir.mkdir()
        private.mkdir()
        copy = private / "submission.ipynb"
        nbformat.write(notebook, copy)
        shutil.copy(copy, workdir / path.name)
        progress_file = private / "progress.json"
        status = _run_worker(copy, workdir, progress_file, cell_timeout, notebook_timeout)
        recorded = progress.load(progress_file)
    results = {}
    for ident in ids:
        entry = recorded.get(ident)
        if entry is None:
            results[ident] = ("not run", "")
        else:
            result = {"passed": "passed", "failed": "failed", "stub": "not attempted"}
            results[ident] = (result[entry["last"]], str(entry.get("hint", "")))
    return NotebookGrade(student, path.name, status, results)


def grade(submissions_dir: Path, cell_timeout: float = CELL_TIMEOUT_S,
          notebook_timeout: float = NOTEBOOK_TIMEOUT_S, log=None) -> list[NotebookGrade]:
    """Grade every submission under ``submissions_dir``."""
    if not cell_timeout > 0 or not notebook_timeout > 0:
        raise ValueError("cell_timeout and notebook_timeout must be positive numbers of seconds")
    grades = []
    for student, path in find_submissions(submissions_dir):
        grade_ = grade_notebook(student, path, cell_timeout, notebook_timeout)
        if log is not None:
            log(f"{student}/{path.name}: {grade_.status}, {grade_.passed} of "
                f"{len(grade_.results)} exercises passed")
        grades.append(grade_)
    return grades


def gradebook_csv(grades: list[NotebookGrade]) -> str:
    """One row per student, notebook and exercise: result and hint."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["student", "notebook", "run", "exercise", "result", "hint"])
    for grade_ in grades:
        if not grade_.results:
            writer.writerow([grade_.student, grade_.notebook, grade_.status, "", "", ""])
        for ident, (result, hint) in grade_.results.items():
            writer.writerow([grade_.student, grade_.notebook, grade_.status, ident, result, hint])
    return buffer.getvalue()


def summary_markdown(grades: list[NotebookGrade]) -> str:
    """A table per student (passed / total, per exercise), then every hint given."""
    mark = {"passed": "✓", "failed": "✗", "not attempted": "·", "not run": "–"}
    ids = sorted({ident for grade_ in grades for ident in grade_.results})
    lines = ["# Gradebook", "", "✓ passed, ✗ failed, · not attempted, – not run", "",
             "| student | notebook | run | passed | " + " | ".join(ids) + " |",
             "|---|---|---|---|" + "---|" * len(ids)]
    for grade_ in grades:
        cells = [mark[grade_.results[ident][0]] if ident in grade_.results else ""
                 for ident in ids]
        lines.append(f"| {grade_.student} | {grade_.notebook} | {grade_.status} | "
                     f"{grade_.passed}/{len(grade_.results)} | " + " | ".join(cells) + " |")
    hints = [(grade_.student, ident, hint.replace("\n", " "))
             for grade_ in grades for ident, (result, hint) in grade_.results.items()
             if result == "failed"]
    if hints:
        lines += ["", "## Hints given", ""]
        lines += [f"- {student}, `{ident}`: {hint}" for student, ident, hint in hints]
    return "\n".join(lines) + "\n"


def write_gradebook(grades: list[NotebookGrade], out: Path) -> tuple[Path, Path]:
    """Write ``out`` (CSV) and the Markdown summary beside it (``.md``); return both paths."""
    out = Path(out)
    summary = out.with_suffix(".md")
    atomic_write_text(out, gradebook_csv(grades))
    atomic_write_text(summary, summary_markdown(grades))
    return out, summary


def _run_one(notebook_path: str, workdir: str, cell_timeout: str) -> int:
    """Child process: execute one notebook; exit 0, or 3 if its kernel died, 4 if none started."""
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    notebook = nbformat.read(notebook_path, as_version=4)
    client = NotebookClient(notebook, timeout=float(cell_timeout), kernel_name="python3",
                            allow_errors=True, interrupt_on_timeout=True,
                            resources={"metadata": {"path": workdir}})
    try:
        client.execute()
    except DeadKernelError:
        return 3
    except RuntimeError:
        return 4 if client.kc is None else 3
    return 0


if __name__ == "__main__":
    sys.exit(_run_one(*sys.argv[1:4]))
