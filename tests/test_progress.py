"""Progress: every check is recorded in the user's data directory, atomically, and
``python -m pedaPEFT progress`` reports it per lesson."""

import json

import pytest

from pedaPEFT import exercises, progress
from pedaPEFT.__main__ import main
from pedaPEFT.exercise_bank import EXERCISES, lesson01


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.ENV_VARIABLE, raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(progress.sys, "platform", "linux")
    return tmp_path


def test_checks_are_recorded_in_the_data_directory(home, capsys):
    with pytest.raises(exercises.ExerciseError):
        exercises.check("01-break-even-rank", 3)
    with pytest.raises(exercises.ExerciseError):
        exercises.check("01-rref", ...)
    exercises.check("01-break-even-rank", lesson01._break_even_rank())
    path = home / ".local" / "share" / "pedaPEFT" / "progress.json"
    recorded = json.loads(path.read_text())["exercises"]
    assert recorded["01-break-even-rank"]["attempts"] == 2
    assert recorded["01-break-even-rank"]["last"] == "passed"
    assert recorded["01-rref"]["last"] == "stub"
    assert [p.name for p in path.parent.iterdir()] == ["progress.json"]  # no temporary left
    capsys.readouterr()
    assert main(["progress"]) == 0
    table = capsys.readouterr().out
    assert str(path) in table
    assert "01-break-even-rank" in table and "Lesson 01  (1 done, 0 tried, 2 not started)" in table


def test_tried_and_the_environment_variable(tmp_path, monkeypatch, capsys):
    target = tmp_path / "elsewhere" / "mine.json"
    monkeypatch.setenv(progress.ENV_VARIABLE, str(target))
    with pytest.raises(exercises.ExerciseError):
        exercises.check("05-mt0-percent", 50.0)
    assert progress.status(progress.load(target)["05-mt0-percent"]) == "tried"
    assert main(["progress"]) == 0
    assert "0 done, 1 tried" in capsys.readouterr().out


def test_an_unreadable_file_is_set_aside_and_a_read_only_one_never_fails_a_check(tmp_path,
                                                                              monkeypatch):
    target = tmp_path / "progress.json"
    target.write_text("{not json")
    monkeypatch.setenv(progress.ENV_VARIABLE, str(target))
    exercises.check("01-break-even-rank", lesson01._break_even_rank())
    assert (tmp_path / "progress.json.unreadable").read_text() == "{not json"
    assert progress.load(target)["01-break-even-rank"]["passed_once"]
    monkeypatch.setenv(progress.ENV_VARIABLE, str(tmp_path / "file" / "below" / "a file"))
    (tmp_path / "file").write_text("")
    exercises.check("01-break-even-rank", lesson01._break_even_rank())  # no exception


def test_the_list_names_every_exercise(capsys):
    assert main(["progress", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(f"`{ident}`" in listing for ident in EXERCISES)


def test_the_readme_lists_the_exercises_as_the_command_prints_them():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert progress.exercise_list(EXERCISES) in readme, (
        "README's exercise list is out of date: paste `python -m pedaPEFT progress --list`")
