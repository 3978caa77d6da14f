"""docs/coverage.md lists every slide of the lecture, in order, and points to sections that exist.

The slide titles are kept in ``tests/data/lecture_slides.txt``, one a line, parsed from the
lecture's text; with ``PEDAPEFT_LECTURE`` set to that text's path, the parse is redone and
compared. A slide's title is a line of the lecture text that starts a block (it follows an
empty line), starts at the margin with neither a list marker, a formula, a link, a table,
code, a number nor a numbered step, holds no tab (a table row), is at most ``MAX_TITLE``
characters long, does not end with ``.`` or ``:``, and is not one of ``NOT_TITLES`` below
(the authors and affiliations of the title slides, the YAML keys of the axolotl slide, and
the captions that stand alone inside a slide).
"""

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLIDES = ROOT / "tests" / "data" / "lecture_slides.txt"
LECTURE = os.environ.get("PEDAPEFT_LECTURE")
COVERAGE = ROOT / "docs" / "coverage.md"

NOT_TITLES = {
    "AI with Deep Learning",
    "Prof. Lai-Man Po",
    "Department of Electrical Engineering",
    "Armen Aghajanyan",
    "Sonal Gupta",
    "Luke Zettlemoyer",
    "Tim Dettmers*",
    "Artidoro Pagnoni*",
    "Ari Holtzman",
    "University of Washington",
    r"where $\Delta\mathbf{W} = \mathbf{BA}$ is a low-rank matrix",
    r"LoRA fine-tuned model performance \approx Full fine-tuned model performance",
    "LoRA is extremely competitive with full finetuning",
    "And the number of trainable parameter is less than 1% of the total model size",
    "LoRA reduces the number of trainable parameters in GPT-3 by **5 orders of magnitude!**",
    "lora_r: 32",
    "lora_alpha: 16",
    "lora_dropout: 0.05",
    "lora_target_linear: true",
}
NOT_A_TITLE_START = re.compile(r"[-$<`|\\*\s]|\d+(\.|$)")
MAX_TITLE = 90
REFERENCE = re.compile(r"\[lesson (\d+) — (.+?)\]\(\.\./lessons/(\d\d)_\w+\.ipynb\)")


def slide_titles(text: str) -> list[str]:
    """The lecture's slide titles, in order (see the module docstring for the rule)."""
    titles, after_empty, in_code = [], True, False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code, after_empty = not in_code, False
            continue
        if in_code:
            continue
        if not line.strip():
            after_empty = True
            continue
        if (after_empty and not NOT_A_TITLE_START.match(line) and not line.endswith((".", ":"))
                and "\t" not in line and len(line) <= MAX_TITLE and line not in NOT_TITLES):
            titles.append(line)
        after_empty = False
    return titles


def coverage_rows(text: str) -> list[tuple[int, str, str]]:
    """``(number, slide, taught in)`` of every row of the coverage table."""
    rows = []
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].isdigit():
            rows.append((int(cells[0]), cells[1], cells[2]))
    return rows


def lesson_headings(number: int) -> set[str]:
    scripts = list((ROOT / "lessons").glob(f"{number:02d}_*.py"))
    if not scripts:
        return set()
    return {m.group(1) for m in re.finditer(r"^# #+ (.+)$", scripts[0].read_text(), re.M)}


def stored_titles() -> list[str]:
    return SLIDES.read_text(encoding="utf-8").splitlines()


@pytest.mark.skipif(not LECTURE, reason="set PEDAPEFT_LECTURE to the lecture's text to check")
def test_the_stored_titles_are_the_lectures():
    text = Path(LECTURE).read_text(encoding="utf-8")
    assert not NOT_TITLES - set(text.splitlines()), "NOT_TITLES names lines the lecture lacks"
    assert slide_titles(text) == stored_titles()


def test_the_parser_keeps_titles_and_drops_the_rest():
    text = "\n".join([
        "Content", "", "- a bullet", "", "4-bit NormalFloat (NF4)", "",
        "1. a numbered step", "", "Steps for generating the values:", "", "lora_r: 32", "",
        "```", "", "inside code", "```", "", "$x = 1$", "", "A sentence ends.", "", "24", "",
        "a\ttable\trow", "", "A caption " + "x" * 90, "",
        "(2) Feature-based Approach", "follows a line, so not a title", "",
    ])
    assert slide_titles(text) == ["Content", "4-bit NormalFloat (NF4)",
                                  "(2) Feature-based Approach"]


def coverage_problems(coverage: str, titles: list[str]) -> list[str]:
    """Everything wrong with a coverage table against the slide titles: rows out of order or
    missing, covered rows without a reference or naming a section its lesson lacks,
    "not covered" rows without a reason."""
    rows = coverage_rows(coverage)
    problems = []
    if [number for number, _, _ in rows] != list(range(1, len(rows) + 1)):
        problems.append("rows are not numbered 1, 2, 3, ...")
    listed = [slide for _, slide, _ in rows]
    problems += [f"slide without a row: {t!r}" for t in titles if t not in listed]
    if listed != titles:
        problems.append("the rows are not the slides in the lecture's order")
    for number, slide, taught in rows:
        if taught.lower().startswith("not covered"):
            if len(taught[len("not covered"):].strip(" —-:")) < 10:
                problems.append(f"row {number} ({slide}): no reason why it is not covered")
            continue
        references = REFERENCE.findall(taught)
        if not references:
            problems.append(f"row {number} ({slide}): no [lesson N — heading](link) reference")
        for lesson, heading, file_number in references:
            if int(lesson) != int(file_number):
                problems.append(f"row {number}: the link of lesson {lesson} goes elsewhere")
            elif heading not in lesson_headings(int(lesson)):
                problems.append(f"row {number} ({slide}): lesson {lesson} has no section "
                                f"{heading!r}")
    return problems


def test_the_coverage_table_lists_every_slide_and_existing_sections():
    assert coverage_problems(COVERAGE.read_text(encoding="utf-8"), stored_titles()) == []


def test_the_checks_catch_a_broken_table():
    good = "\n".join([
        "| # | Slide | Taught in |", "|---:|---|---|",
        "| 1 | Content | not covered — the table of contents of the lecture |",
        "| 2 | Recap: SVD | [lesson 2 — 1. The singular value decomposition]"
        "(../lessons/02_svd_low_rank.ipynb) |",
    ])
    titles = ["Content", "Recap: SVD"]
    assert coverage_problems(good, titles) == []
    assert coverage_problems(good, [*titles, "Another slide"])  # a slide without a row
    assert coverage_problems(good, titles[::-1])  # out of order
    assert coverage_problems(good.replace("1. The singular", "1. A singular"), titles)
    assert coverage_problems(good.replace("lesson 2 —", "lesson 3 —"), titles)
    assert coverage_problems(good.replace("the table of contents of the lecture", ""), titles)
    assert coverage_problems(good.replace("[lesson 2 — ", "[lessons 2 — "), titles)
