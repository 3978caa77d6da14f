"""A student's progress: the last result of every exercise check, kept in one JSON file.

The file lives in the user's data directory — ``$XDG_DATA_HOME/pedaPEFT/progress.json``
(default ``~/.local/share/pedaPEFT``) on Linux, ``~/Library/Application Support/pedaPEFT`` on
macOS, ``%APPDATA%\\pedaPEFT`` on Windows — or wherever ``PEDAPEFT_PROGRESS_FILE`` points.
It is rewritten atomically (temporary file, then rename), so an interrupted check never leaves
a half-written file; a file that does not parse is set aside as ``progress.json.unreadable``.

Each exercise id maps to ``{"last": "passed" | "failed" | "stub", "hint": str, "attempts": int,
"passed_once": bool, "updated": ISO time}``. An exercise is *done* once it has passed,
*tried* when it has failed (and never passed), *not started* otherwise (a stub does not count).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from pedaPEFT.files import atomic_write_text

ENV_VARIABLE = "PEDAPEFT_PROGRESS_FILE"
STATES = ("passed", "failed", "stub")


def data_dir() -> Path:
    """The platform's per-user data directory for pedaPEFT."""
    if sys.platform == "win32":
        base = Path(os.environ.get("APPDATA") or Path.home() / "AppData" / "Roaming")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "pedaPEFT"


def progress_path() -> Path:
    """``$PEDAPEFT_PROGRESS_FILE`` if set, else ``data_dir() / "progress.json"``."""
    override = os.environ.get(ENV_VARIABLE)
    return Path(override) if override else data_dir() / "progress.json"


def load(path: Path | None = None) -> dict[str, dict]:
    """Every recorded exercise, by id; ``{}`` when there is no (readable) file."""
    path = progress_path() if path is None else Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    exercises = data.get("exercises") if isinstance(data, dict) else None
    if not isinstance(exercises, dict):
        return {}
    return {key: value for key, value in exercises.items()
            if isinstance(key, str) and isinstance(value, dict) and value.get("last") in STATES}


def _set_aside_if_unreadable(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, ValueError):
        os.replace(path, path.with_name(path.name + ".unreadable"))


def record(exercise_id: str, state: str, hint: str = "", path: Path | None = None) -> bool:
    """Record one check's result; return False (and change nothing) if the file can't be written.

    Progress is a convenience: a read-only home directory must never make a check fail.
    """
    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    path = progress_path() if path is None else Path(path)
    try:
        _set_aside_if_unreadable(path)
        exercises = load(path)
        entry = exercises.get(exercise_id, {"attempts": 0, "passed_once": False})
        if state != "stub":
            entry["attempts"] = int(entry.get("attempts", 0)) + 1
        entry["last"] = state
        entry["hint"] = hint
        entry["passed_once"] = bool(entry.get("passed_once")) or state == "passed"
        entry["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
        exercises[exercise_id] = entry
        atomic_write_text(path, json.dumps({"version": 1, "exercises": exercises}, indent=1,
                                           sort_keys=True) + "\n")
    except OSError:
        return False
    return True


def status(entry: dict | None) -> str:
    """``"done"``, ``"tried"`` or ``"not started"`` for one recorded entry (or None)."""
    if not entry:
        return "not started"
    if entry.get("passed_once"):
        return "done"
    return "tried" if entry.get("attempts", 0) > 0 else "not started"


def table(exercises: dict, recorded: dict[str, dict]) -> str:
    """A plain-text table per lesson: each exercise with its status, then the lesson's totals."""
    lines: list[str] = []
    by_lesson: dict[int, list] = {}
    for exercise in exercises.values():
        by_lesson.setdefault(exercise.lesson, []).append(exercise)
    for lesson in sorted(by_lesson):
        rows = sorted(by_lesson[lesson], key=lambda exercise: exercise.id)
        states = [status(recorded.get(exercise.id)) for exercise in rows]
        counts = ", ".join(f"{states.count(name)} {name}"
                           for name in ("done", "tried", "not started"))
        lines.append(f"Lesson {lesson:02d}  ({counts})")
        width = max(len(exercise.id) for exercise in rows)
        for exercise, state in zip(rows, states, strict=True):
            lines.append(f"  {exercise.id:<{width}}  {state:<11}  {exercise.title}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def exercise_list(exercises: dict) -> str:
    """The exercises per lesson as Markdown (the README's list is generated from this)."""
    lines: list[str] = []
    current = None
    for exercise in sorted(exercises.values(), key=lambda exercise: exercise.id):
        if exercise.lesson != current:
            current = exercise.lesson
            lines.append(f"{'' if not lines else chr(10)}**Lesson {current}**\n")
        lines.append(f"- `{exercise.id}` ({exercise.kind}): {exercise.title}")
    return "\n".join(lines) + "\n"
