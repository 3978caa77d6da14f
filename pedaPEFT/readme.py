"""The README's generated parts: the lessons' runtime column and the memory conventions.

``python -m pedaPEFT readme`` writes them; ``--check`` (``differences``, which
``tests/test_readme.py`` runs) reports where the README differs. The runtime column of the
lesson table comes from the runtimes the test run recorded (``pedaPEFT.runtimes``); the text
between the conventions markers is ``memory.conventions_table(markdown=True)``; the note under
the lesson table says how, and under what load, the runtimes were measured.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pedaPEFT import files, memory, runtimes

README = Path(__file__).resolve().parent.parent / "README.md"
LESSON_ROW = re.compile(r"^\| (\d+) \| \[[^\]]+\]\(lessons/(\w+)\.ipynb\) \|.*\| ([^|]*) \|$")
CONVENTIONS_BEGIN = "<!-- memory conventions: written by python -m pedaPEFT readme -->"
CONVENTIONS_END = "<!-- end of memory conventions -->"
RUNTIMES_BEGIN = "<!-- runtimes note: written by python -m pedaPEFT readme -->"
RUNTIMES_END = "<!-- end of runtimes note -->"


def runtime_cell(seconds: float) -> str:
    """How the lesson table shows a runtime: whole seconds."""
    return f"{max(1, round(seconds))} s"


def _runtimes_note(recorded: dict[str, dict[str, float]]) -> str:
    loads = [entry["load"] for entry in recorded.values()]
    cpus = sorted({int(entry["cpus"]) for entry in recorded.values()})
    return (
        f"Runtimes are recorded by the test run, not typed: `python -m pytest lessons/ "
        f"--record-runtimes` stores the {runtimes.HOW} in `benchmarks/lesson_runtimes.json`, "
        f"and `python -m pedaPEFT "
        f"readme` copies them into this table (a test checks that they agree). They were "
        f"measured on a {'/'.join(map(str, cpus))}-core CPU shared with other work: the "
        f"1-minute load average was {min(loads):.1f}–{max(loads):.1f} while the lessons ran, "
        f"so an idle machine of the same kind is faster."
    )


def _replace_between(text: str, begin: str, end: str, body: str) -> str:
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"README: the markers {begin!r} and {end!r} are missing")
    return text[: start + len(begin)] + "\n" + body + "\n" + text[stop:]


def render(text: str, recorded: dict[str, dict[str, float]] | None = None) -> str:
    """``text`` (the README) with its generated parts brought up to date."""
    recorded = runtimes.read() if recorded is None else recorded
    lines = []
    for line in text.split("\n"):
        match = LESSON_ROW.match(line)
        if match and match.group(2) in recorded:
            cell = runtime_cell(recorded[match.group(2)]["seconds"])
            line = line[: match.start(3)] + cell + line[match.end(3):]
        lines.append(line)
    text = "\n".join(lines)
    if recorded:
        text = _replace_between(text, RUNTIMES_BEGIN, RUNTIMES_END, _runtimes_note(recorded))
    return _replace_between(text, CONVENTIONS_BEGIN, CONVENTIONS_END,
                            memory.conventions_table(markdown=True))


def differences(path: str | os.PathLike = README) -> list[str]:
    """Where the README differs from what ``render`` writes (an empty list: up to date)."""
    text = Path(path).read_text(encoding="utf-8")
    recorded = runtimes.read()
    problems = []
    for line in text.split("\n"):
        match = LESSON_ROW.match(line)
        if match and match.group(2) not in recorded:
            problems.append(f"lesson {match.group(2)} has no recorded runtime: run python -m "
                            f"pytest lessons/{match.group(2)}.ipynb --record-runtimes")
    if render(text, recorded) != text:
        problems.append("README.md is not what python -m pedaPEFT readme writes: run it")
    return problems


def update(path: str | os.PathLike = README) -> Path:
    """Rewrite the README's generated parts in place (atomically)."""
    text = Path(path).read_text(encoding="utf-8")
    return files.atomic_write_text(path, render(text))


def main(check: bool = False) -> int:
    """``python -m pedaPEFT readme [--check]``: rewrite the generated parts, or report drift."""
    if not check:
        print(f"wrote {update()}")
    problems = differences()
    for problem in problems:
        print(problem)
    print("README.md is up to date" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0
