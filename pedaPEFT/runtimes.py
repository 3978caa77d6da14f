"""The lessons' runtimes, as the test run measures them.

``python -m pytest lessons/ --record-runtimes`` (the option is defined in the repository's
``conftest.py``) adds up, for every lesson notebook nbval runs, the durations of the setup,
call and teardown of each of its cells: kernel start, every cell, kernel stop. It records the
seconds of the notebooks whose cells all passed, with the machine's core count and its
1-minute load average while the notebook ran, in ``benchmarks/lesson_runtimes.json``. A
recording replaces that lesson's entry only; the file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from pedaPEFT import files

RUNTIMES_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "lesson_runtimes.json"
HOW = "wall time of each lesson notebook under strict nbval (kernel start, every cell, kernel stop)"


def read(path: str | os.PathLike = RUNTIMES_FILE) -> dict[str, dict[str, float]]:
    """The recorded lessons: ``{"01_matrix_rank": {"seconds": ..., "cpus": ..., "load": ...}}``."""
    path = Path(path)
    if not path.exists():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))["lessons"]


def record(seconds: dict[str, float], loads: dict[str, float],
           path: str | os.PathLike = RUNTIMES_FILE) -> Path:
    """Store ``seconds`` per lesson (and the mean load average while each ran) in ``path``.

    Entries of other lessons are kept; the file is replaced atomically.
    """
    for name, value in [*seconds.items(), *loads.items()]:  # a load must not hide a time
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value >= 0
        ):
            raise ValueError(f"seconds and loads must be finite numbers >= 0, got {name}={value!r}")
    lessons = read(path)
    for name, value in seconds.items():
        lessons[name] = {"seconds": round(value, 1), "cpus": os.cpu_count() or 1,
                         "load": round(loads.get(name, 0.0), 1)}
    text = json.dumps({"how": HOW, "lessons": dict(sorted(lessons.items()))}, indent=2)
    return files.atomic_write_text(path, text + "\n")
