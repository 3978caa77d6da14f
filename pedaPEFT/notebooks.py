"""The lesson pipeline: percent scripts -> executed notebooks -> student copies.

Lessons are authored as jupytext percent scripts (``lessons/NN_slug.py``) because a text file
diffs and reviews well. :func:`build` turns a script into ``lessons/NN_slug.ipynb`` (executed
top to bottom in a fresh kernel, outputs stored, metadata normalised so that rebuilding an
unchanged lesson gives the same file) and into ``lessons/student/NN_slug.ipynb``, where every
solution region is replaced by a stub and all outputs are cleared. :func:`check` reports any
drift between the three without executing anything.
"""

import ast
import copy
import os
import re
import tempfile
import textwrap
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

import pedaPEFT
from pedaPEFT import progress
from pedaPEFT.files import atomic_write_text

LESSONS_DIR = Path(__file__).resolve().parent.parent / "lessons"
STUDENT_DIR_NAME = "student"
BEGIN_SOLUTION = "### BEGIN SOLUTION"
END_SOLUTION = "### END SOLUTION"
STUB_MARK = "# YOUR CODE HERE"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
CELL_TIMEOUT_S = 600


INSTALL_SOURCE_VARIABLE = "PEDAPEFT_INSTALL_SOURCE"
SETUP_CELL = """\
# Setup, the same in every lesson: install pedaPEFT if this Python lacks it (Colab, JupyterHub),
# check that it is a version this lesson was written for, and seed every random generator.
# To install from elsewhere than the course repository, set {variable} to a
# wheel file, a folder of wheels or any pip requirement (a school's mirror, a pinned version).
import importlib.util
import os
import subprocess
import sys

LESSON_VERSION = "{version}"
if importlib.util.find_spec("pedaPEFT") is None:
    install_source = os.environ.get(
        "{variable}", f"git+{repository}@v{{LESSON_VERSION}}"
    )
    install_args = [install_source]
    if os.path.isdir(install_source):
        install_args = ["--find-links", install_source, f"pedapeft=={{LESSON_VERSION}}"]
    print(f"installing pedaPEFT {{LESSON_VERSION}} from {{install_source}} ...", flush=True)
    pip_run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *install_args],
                             capture_output=True, text=True)
    if pip_run.returncode != 0:
        raise RuntimeError(f"pip could not install pedaPEFT:\\n{{pip_run.stderr}}")
    importlib.invalidate_caches()
    if importlib.util.find_spec("pedaPEFT") is None:
        raise RuntimeError("pedaPEFT was installed: restart the kernel and run this cell again")

import pedaPEFT
from pedaPEFT.course import check_version, seed_everything

check_version(LESSON_VERSION)
seed_everything(0)
print(f"pedaPEFT {{pedaPEFT.__version__}}")"""
"""The first code cell of every lesson, for the version it was written for (``{version}``).

It must run where pedaPEFT is missing, so it cannot call the package to install it. What it
prints when it installs (the line starting ``installing pedaPEFT``) is removed by an nbval
sanitize rule in ``tests/nbval_sanitize.cfg``, so a stored lesson matches both runs.
"""


def setup_cell(version: str) -> str:
    """The setup cell of a lesson written for pedaPEFT ``version`` (installs tag ``v<version>``)."""
    return SETUP_CELL.format(
        version=version, repository=pedaPEFT.REPOSITORY_URL, variable=INSTALL_SOURCE_VARIABLE
    )


class LessonError(RuntimeError):
    """A lesson script cannot be built: a failing cell, stderr output, or a broken marker."""


def lesson_sources(lessons_dir: Path = LESSONS_DIR) -> list[Path]:
    """Every lesson script, ``NN_slug.py``, in lesson order."""
    return sorted(lessons_dir.glob("[0-9][0-9]_*.py"))


def find_sources(names: list[str], lessons_dir: Path = LESSONS_DIR) -> list[Path]:
    """Resolve lesson names (``03_finetuning``, ``03`` or a path) to their scripts."""
    sources = lesson_sources(lessons_dir)
    if not names:
        return sources
    chosen = []
    for name in names:
        stem = Path(name).stem
        matches = [path for path in sources if path.stem == stem or path.stem.split("_")[0] == stem]
        if len(matches) != 1:
            available = ", ".join(path.stem for path in sources)
            raise ValueError(
                f"lesson {name!r} matches {len(matches)} scripts; available: {available}"
            )
        chosen.append(matches[0])
    return chosen


def read_script(path: Path) -> nbformat.NotebookNode:
    """Parse a percent script into an unexecuted notebook with normalised metadata."""
    notebook = jupytext.read(path, fmt="py:percent")
    return normalise(notebook)


def normalise(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Keep only what a lesson needs: python3 kernelspec, stable cell ids, cell tags."""
    notebook = copy.deepcopy(notebook)
    notebook.metadata = nbformat.from_dict(
        {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    )
    notebook.nbformat, notebook.nbformat_minor = 4, 5
    for number, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{number:03d}"
        tags = cell.metadata.get("tags")
        cell.metadata = nbformat.from_dict({"tags": tags} if tags else {})
    return notebook


def solution_regions(source: str) -> list[tuple[int, int]]:
    """Line ranges ``(begin, end)`` of the solution markers in a cell; markers are whole lines."""
    regions, begin = [], None
    for number, line in enumerate(source.splitlines()):
        stripped = line.strip()
        if "BEGIN SOLUTION" in stripped or "END SOLUTION" in stripped:
            if stripped not in (BEGIN_SOLUTION, END_SOLUTION):
                raise LessonError(f"solution marker must be a whole line, got {stripped!r}")
            if stripped == BEGIN_SOLUTION:
                if begin is not None:
                    raise LessonError("nested '### BEGIN SOLUTION'")
                begin = number
            else:
                if begin is None:
                    raise LessonError("'### END SOLUTION' without a BEGIN")
                regions.append((begin, number))
                begin = None
    if begin is not None:
        raise LessonError("'### BEGIN SOLUTION' is never closed")
    return regions


def _stub_for(solution: str, indent: str) -> list[str]:
    """Stub lines for a solution: ``name = ...`` per assigned name, a raising body per def."""
    try:
        tree = ast.parse(textwrap.dedent(solution))
    except SyntaxError as error:
        raise LessonError(f"solution region does not parse: {error}") from None
    lines: list[str] = []
    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef):
            # the decorators (e.g. @staticmethod), one line each, then the def line
            header = ast.unparse(statement).splitlines()[: len(statement.decorator_list) + 1]
            lines += [indent + line for line in header]
            docstring = ast.get_docstring(statement, clean=False)
            if docstring is not None:
                lines.append(f'{indent}    """{docstring}"""')
            lines.append(indent + f'    raise NotImplementedError("{STUB_MARK[2:]}")')
            continue
        targets: list[ast.expr] = []
        if isinstance(statement, ast.Assign):
            targets = statement.targets
        elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
            targets = [statement.target]
        for target in targets:
            for node in ast.walk(target):
                if isinstance(node, ast.Name):
                    line = f"{indent}{node.id} = ...  {STUB_MARK}"
                    if line not in lines:
                        lines.append(line)
    return lines or [indent + STUB_MARK]


def strip_solutions(source: str) -> str:
    """The student version of a cell's source: each solution region replaced by its stub."""
    lines = source.splitlines()
    regions = solution_regions(source)
    for begin, end in reversed(regions):
        indent = re.match(r"\s*", lines[begin]).group(0)
        lines[begin : end + 1] = _stub_for("\n".join(lines[begin + 1 : end]), indent)
    return "\n".join(lines)


def student_version(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy with solutions stubbed out and every output and execution count cleared."""
    student = copy.deepcopy(notebook)
    for cell in student.cells:
        if cell.cell_type != "code":
            continue
        cell.source = strip_solutions(cell.source)
        cell.outputs = []
        cell.execution_count = None
    return student


def execute(notebook: nbformat.NotebookNode, cwd: Path, allow_errors: bool = False):
    """Run every cell in a fresh ``python3`` kernel started in ``cwd``; return the notebook.

    The kernel records its exercise checks in a throwaway progress file, so building or
    testing the lessons never touches the author's own progress.
    """
    client = NotebookClient(
        copy.deepcopy(notebook),
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        allow_errors=allow_errors,
        resources={"metadata": {"path": str(cwd)}},
    )
    with tempfile.TemporaryDirectory(prefix="pedapeft-build-") as scratch:
        throwaway = Path(scratch) / "progress.json"
        executed = client.execute(env=dict(os.environ, **{progress.ENV_VARIABLE: str(throwaway)}))
    for cell in executed.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    return executed


def coalesce_streams(outputs: list) -> list:
    """Merge consecutive stream outputs of the same name, as Jupyter shows them.

    How a kernel splits one ``print`` into messages depends on timing; merging makes a rebuilt
    notebook byte-identical to the last build when nothing changed.
    """
    merged: list = []
    for output in outputs:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and output.output_type == "stream"
            and previous.output_type == "stream"
            and previous.name == output.name
        ):
            previous.text += output.text
        else:
            merged.append(output)
    return merged


def stderr_cells(notebook: nbformat.NotebookNode) -> list[int]:
    """Indices of code cells that wrote to stderr (nbval fails on those)."""
    return [
        number
        for number, cell in enumerate(notebook.cells)
        if cell.cell_type == "code"
        and any(output.get("name") == "stderr" for output in cell.get("outputs", []))
    ]


def write_notebook(notebook: nbformat.NotebookNode, path: Path) -> None:
    """Validate and write a notebook atomically."""
    nbformat.validate(notebook)
    atomic_write_text(path, nbformat.writes(notebook) + "\n")


def build(source: Path) -> tuple[Path, Path]:
    """Execute one lesson script; write its notebook and its student copy. Return both paths."""
    notebook = read_script(source)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            solution_regions(cell.source)
    try:
        executed = execute(notebook, cwd=source.parent)
    except Exception as error:
        raise LessonError(f"{source.name}: a cell failed:\n{error}") from None
    noisy = stderr_cells(executed)
    if noisy:
        raise LessonError(f"{source.name}: cells {noisy} wrote to stderr; fix the warning")
    lesson_path = source.with_suffix(".ipynb")
    student_path = source.parent / STUDENT_DIR_NAME / lesson_path.name
    write_notebook(executed, lesson_path)
    write_notebook(student_version(executed), student_path)
    return lesson_path, student_path


def _sources_of(notebook: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def check(lessons_dir: Path = LESSONS_DIR) -> list[str]:
    """Every drift between scripts, notebooks and student copies, as readable problems."""
    problems = []
    sources = lesson_sources(lessons_dir)
    source_stems = {path.stem for path in sources}
    for notebook_path in sorted(lessons_dir.glob("*.ipynb")):
        if notebook_path.stem not in source_stems:
            problems.append(f"{notebook_path.name} has no script {notebook_path.stem}.py")
    for student_path in sorted((lessons_dir / STUDENT_DIR_NAME).glob("*.ipynb")):
        if student_path.stem not in source_stems:
            problems.append(f"student/{student_path.name} has no script {student_path.stem}.py")
    for source in sources:
        lesson_path = source.with_suffix(".ipynb")
        student_path = lessons_dir / STUDENT_DIR_NAME / lesson_path.name
        if not lesson_path.exists():
            problems.append(f"{source.name} was never built: run the lessons command on it")
            continue
        built = nbformat.read(lesson_path, as_version=4)
        if _sources_of(read_script(source)) != _sources_of(built):
            problems.append(f"{lesson_path.name} differs from {source.name}: rebuild it")
        expected_student = nbformat.writes(student_version(built)) + "\n"
        if not student_path.exists():
            problems.append(f"student/{student_path.name} is missing: rebuild {source.stem}")
        elif student_path.read_text(encoding="utf-8") != expected_student:
            problems.append(f"student/{student_path.name} is out of date: rebuild {source.stem}")
    return problems


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    """The code cells of a notebook, in order."""
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def is_check_cell(source: str) -> bool:
    """A check cell calls a helper of :mod:`pedaPEFT.exercises` (``check`` or ``check_*``)."""
    return re.search(r"\bexercises\.check(_\w+)?\(", source) is not None


def load(path: Path) -> nbformat.NotebookNode:
    """Read a stored notebook."""
    return nbformat.reads(Path(path).read_text(encoding="utf-8"), as_version=4)

