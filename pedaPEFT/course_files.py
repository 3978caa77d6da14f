"""What the course ships inside the package, and where it writes what it makes.

Everything a lesson *reads* is package data, found through :mod:`importlib.resources`, so it is
there in a clone (editable install), in a wheel installed by pip, in Colab and on a JupyterHub:

* ``pedaPEFT/results/*.json``: the committed full-configuration experiment results that
  lessons 4, 5 and 9 plot (:func:`shipped_results`);
* ``pedaPEFT/weights/``: the pretrained base models (``gpt.load_pretrained``);
* ``pedaPEFT.lessons``: the lesson notebooks and their student copies, which live in the
  repository's top-level ``lessons/`` and are mapped into the package by ``pyproject.toml``
  (:func:`copy_lessons`).

Everything the course *writes* (regenerated results, figures, runs, checkpoints) goes to a
path relative to the working directory, ``RESULTS_OUT`` for results, or wherever ``--out``
says; never into the installed package, which may be read-only and is replaced on upgrade.
A clone refreshes its committed results by naming them: ``--out pedaPEFT/results/NAME.json``.

This module needs only the standard library (and :mod:`pedaPEFT.files`), so ``lessons --copy``
works in an environment that has the package without its test or lesson-building extras.
"""

import json
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from pedaPEFT.files import atomic_write

RESULTS_OUT = Path("results")
"""Default folder, relative to the working directory, for results the experiment commands write."""

LESSON_PATTERN = "[0-9][0-9]_*.ipynb"


def shipped_results(filename: str) -> Traversable:
    """The committed result file ``pedaPEFT/results/<filename>`` (package data)."""
    if not isinstance(filename, str) or "/" in filename or not filename.endswith(".json"):
        raise ValueError(f"filename must be a bare '<name>.json', got {filename!r}")
    return resources.files("pedaPEFT") / "results" / filename


def load_shipped_results(filename: str, command: str) -> dict:
    """Read a committed result file; ``command`` is what regenerates it, named in the error."""
    path = shipped_results(filename)
    if not path.is_file():
        raise ValueError(
            f"no committed results {filename!r} in this pedaPEFT installation ({path}); "
            f"regenerate them with: {command}"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def lesson_notebooks(student: bool = False) -> list[Traversable]:
    """The installed lesson notebooks (or their student copies), in lesson order."""
    try:
        folder = resources.files("pedaPEFT.lessons")
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "this pedaPEFT installation has no lessons (pedaPEFT.lessons is missing); "
            "reinstall it: python -m pip install pedapeft, or python -m pip install -e . in a clone"
        ) from None
    if student:
        folder = folder / "student"
    notebooks = [item for item in folder.iterdir() if item.is_file() and _is_lesson(item.name)]
    if not notebooks:
        raise FileNotFoundError(f"no lesson notebooks found in {folder}")
    return sorted(notebooks, key=lambda item: item.name)


def _is_lesson(name: str) -> bool:
    return Path(name).match(LESSON_PATTERN)


def copy_lessons(destination: str | os.PathLike, student: bool = False,
                 force: bool = False) -> list[Path]:
    """Copy the lesson notebooks (``student=True``: the exercise versions) into ``destination``.

    The folder is created if needed. An existing file of the same name is an error unless
    ``force`` (nothing is copied then); each file is written atomically. Returns the paths.
    """
    destination = Path(destination)
    if destination.exists() and not destination.is_dir():
        raise NotADirectoryError(f"destination must be a folder, {destination} is a file")
    notebooks = lesson_notebooks(student)
    targets = [destination / item.name for item in notebooks]
    existing = [target for target in targets if target.exists()]
    if existing and not force:
        names = ", ".join(target.name for target in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise FileExistsError(
            f"{destination} already has {names}{more}; choose an empty folder, or pass --force "
            "to overwrite them"
        )
    destination.mkdir(parents=True, exist_ok=True)
    for item, target in zip(notebooks, targets, strict=True):
        content = item.read_bytes()
        atomic_write(target, lambda temporary, data=content: Path(temporary).write_bytes(data))
    return targets
