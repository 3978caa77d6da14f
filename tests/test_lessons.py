"""The lessons: in sync with their scripts, lint-clean, and their student copies fail helpfully.

The strict nbval run (collected from ``lessons/``) proves that every stored output, including
each solution's check, is reproduced by a fresh run; these tests check everything else.
"""

import inspect
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest

import pedaPEFT
from pedaPEFT import figures, figures_quant, notebooks
from pedaPEFT.course import _parse

SOURCES = notebooks.lesson_sources()
NBVAL_MARKERS = {
    "NBVAL_IGNORE_OUTPUT",
    "NBVAL_CHECK_OUTPUT",
    "NBVAL_SKIP",
    "NBVAL_RAISES_EXCEPTION",
}
MINIMUM_EXERCISES = 3
SANITIZE_FILE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"


def lesson_id(path: Path) -> str:
    return path.stem


@pytest.fixture(scope="module", params=SOURCES, ids=lesson_id)
def lesson(request):
    return notebooks.load(request.param.with_suffix(".ipynb"))


def test_there_are_lessons():
    assert SOURCES, "no lesson scripts found in lessons/"


def test_notebooks_and_student_copies_match_their_scripts():
    problems = notebooks.check()
    assert not problems, "\n".join(problems)


def test_kernelspec_is_python3(lesson):
    assert lesson.metadata["kernelspec"]["name"] == "python3"


def test_execution_counts_run_one_to_n(lesson):
    counts = [cell.execution_count for cell in notebooks.code_cells(lesson)]
    assert counts == list(range(1, len(counts) + 1)), "rebuild the lesson top to bottom"


def test_no_stored_errors_or_stderr(lesson):
    for number, cell in enumerate(notebooks.code_cells(lesson)):
        for output in cell.outputs:
            assert output.output_type != "error", f"code cell {number} stored an error"
            assert output.get("name") != "stderr", f"code cell {number} stored stderr output"


def test_markers_are_whole_comment_lines(lesson):
    for cell in notebooks.code_cells(lesson):
        for line in cell.source.splitlines():
            stripped = line.strip()
            if "NBVAL" in stripped:
                assert stripped.lstrip("#").strip() in NBVAL_MARKERS, f"bad marker: {line!r}"
            if "SOLUTION" in stripped and stripped.startswith("#"):
                assert stripped in (notebooks.BEGIN_SOLUTION, notebooks.END_SOLUTION), line
        notebooks.solution_regions(cell.source)


def test_no_cell_relies_on_a_trailing_semicolon(lesson):
    for cell in notebooks.code_cells(lesson):
        code_lines = [
            line
            for line in cell.source.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        ]
        if code_lines:
            assert not code_lines[-1].rstrip().endswith(";"), f"trailing ';' in:\n{cell.source}"


def test_first_cell_is_the_setup_cell_for_a_compatible_version(lesson):
    first = notebooks.code_cells(lesson)[0].source
    match = re.search(r'^LESSON_VERSION = "([0-9.]+)"$', first, re.M)
    assert match, 'the first code cell must set LESSON_VERSION = "X.Y.Z"'
    assert first == notebooks.setup_cell(match.group(1)), (
        "the first code cell must be notebooks.setup_cell(version), character for character"
    )
    written_for = _parse(match.group(1))
    installed = _parse(pedaPEFT.__version__)
    assert written_for <= installed and written_for[0] == installed[0]


def test_every_lesson_opens_with_the_same_setup_cell():
    first_cells = {
        notebooks.code_cells(notebooks.load(source.with_suffix(".ipynb")))[0].source
        for source in SOURCES
    }
    assert len(first_cells) == 1, "the lessons' first code cells differ"


def test_the_setup_cell_checks_the_version_and_seeds():
    cell = notebooks.setup_cell("1.2.3")
    assert 'LESSON_VERSION = "1.2.3"' in cell
    assert "check_version(LESSON_VERSION)" in cell
    assert re.search(r"^seed_everything\(\d+\)$", cell, re.M)
    assert f"git+{pedaPEFT.REPOSITORY_URL}@v{{LESSON_VERSION}}" in cell
    assert notebooks.INSTALL_SOURCE_VARIABLE in cell


def test_nbval_removes_what_the_setup_cell_prints_when_it_installs():
    from nbval.plugin import get_sanitize_patterns

    rules = get_sanitize_patterns(SANITIZE_FILE.read_text())
    printed = "installing pedaPEFT 0.1.0 from /tmp/wheels/pedapeft-0.1.0-py3-none-any.whl ...\n"
    stored = "pedaPEFT 0.1.0\n"
    sanitized = printed + stored
    for regex, replace in rules:
        sanitized = re.sub(regex, replace, sanitized)
    assert sanitized == stored
    cell = notebooks.setup_cell("0.1.0")
    assert 'print(f"installing pedaPEFT {LESSON_VERSION} from {install_source} ..."' in cell


def _returns_a_figure(function) -> bool:
    annotation = inspect.signature(function).return_annotation
    return annotation == "Figure" or getattr(annotation, "__name__", None) == "Figure"


FIGURE_FUNCTIONS = {
    name for module in (figures, figures_quant) for name, value in vars(module).items()
    if inspect.isfunction(value) and _returns_a_figure(value)
}
PLOTTING_CALL = re.compile(
    r"\bplt\.(show|figure|subplots|imshow|plot|bar|barh|hist|scatter|semilogy|loglog)\("
    r"|\bfigures(?:_quant)?\.(\w+)\("
)


def makes_a_figure(source: str) -> bool:
    """Whether a cell draws: a pyplot call, or a package function that returns a Figure."""
    for match in PLOTTING_CALL.finditer(source):
        if match.group(1) or match.group(2) in FIGURE_FUNCTIONS:
            return True
    return False


def figure_problems(notebook: nbformat.NotebookNode) -> list[str]:
    """Cells whose stored outputs lack the image they should show.

    A display output holding only ``<Figure size ...>`` (text/plain, no image/png) is a figure
    that was built but never drawn into the notebook; a cell that draws and stores no image at
    all lost its figure too. Either way the reader of the stored notebook sees no plot.
    """
    problems = []
    for number, cell in enumerate(notebooks.code_cells(notebook)):
        images = [output for output in cell.outputs if "image/png" in output.get("data", {})]
        for output in cell.outputs:
            data = output.get("data", {})
            if "image/png" not in data and str(data.get("text/plain", "")).startswith(
                "<Figure size"
            ):
                problems.append(f"code cell {number} stored {data['text/plain']!r} without "
                                "its image: end the cell with plt.show()")
        if makes_a_figure(cell.source) and not images:
            problems.append(f"code cell {number} draws a figure but stored no image:\n"
                            f"{cell.source}")
    return problems


def test_every_figure_is_stored_as_an_image(lesson):
    problems = figure_problems(lesson)
    assert not problems, "\n".join(problems)


def _notebook_with(source: str, outputs: list) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(source, execution_count=1, outputs=outputs)
    return nbformat.v4.new_notebook(cells=[cell])


def test_the_figure_lint_finds_a_figure_without_its_image():
    bare = nbformat.v4.new_output(
        "execute_result", {"text/plain": "<Figure size 800x380 with 1 Axes>"}, execution_count=1
    )
    assert figure_problems(_notebook_with("figure = figures.qlora_table3()\nfigure", [bare]))
    assert figure_problems(_notebook_with("figure = figures.qlora_table3()", []))
    assert figure_problems(_notebook_with("plt.plot([1, 2])", []))
    drawn = nbformat.v4.new_output(
        "display_data", {"text/plain": "<Figure size 800x380 with 1 Axes>", "image/png": "iVBO"}
    )
    assert not figure_problems(
        _notebook_with("figure = figures.qlora_table3()\nplt.show()", [drawn])
    )
    assert not figure_problems(_notebook_with("photo = figures.sample_photograph()", []))


def test_lesson_has_exercises(lesson):
    checks = [cell for cell in notebooks.code_cells(lesson) if notebooks.is_check_cell(cell.source)]
    solutions = [
        cell for cell in notebooks.code_cells(lesson) if notebooks.solution_regions(cell.source)
    ]
    assert len(checks) >= MINIMUM_EXERCISES and len(solutions) >= MINIMUM_EXERCISES


def run_student_copy(source: Path):
    """The student copy of lesson ``source``, executed with errors allowed."""
    student_path = source.parent / notebooks.STUDENT_DIR_NAME / source.with_suffix(".ipynb").name
    return notebooks.execute(notebooks.load(student_path), cwd=source.parent, allow_errors=True)


@pytest.fixture(scope="module")
def executed_student_copies():
    """Every student copy, run two at a time (each kernel mostly keeps one core busy)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {source: pool.submit(run_student_copy, source) for source in SOURCES}
    return futures


@pytest.mark.parametrize("source", SOURCES, ids=lesson_id)
def test_student_stubs_fail_with_a_hint_and_nothing_else_fails(source, executed_student_copies):
    executed = executed_student_copies[source].result()
    for number, cell in enumerate(notebooks.code_cells(executed)):
        errors = [output for output in cell.outputs if output.output_type == "error"]
        if notebooks.is_check_cell(cell.source):
            assert errors, f"check cell {number} passed on the stub:\n{cell.source}"
            assert errors[0].ename == "ExerciseError", f"cell {number}: {errors[0].ename}"
            assert "Hint:" in errors[0].evalue, f"cell {number} gave no hint: {errors[0].evalue}"
        else:
            assert not errors, f"cell {number} failed in the student copy: {errors[0].evalue}"
