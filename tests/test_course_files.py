"""What the course ships (results, lessons) is package data; what it writes goes elsewhere."""

from importlib import resources
from pathlib import Path

import pytest

import pedaPEFT
from pedaPEFT import course_files, experiments, notebooks
from pedaPEFT.__main__ import main
from pedaPEFT.course import check_version

REPO = Path(__file__).resolve().parent.parent

LESSONS_DIR = notebooks.LESSONS_DIR


def lesson_names() -> list[str]:
    return [source.with_suffix(".ipynb").name for source in notebooks.lesson_sources()]


def test_copy_lessons_copies_every_lesson_byte_for_byte(tmp_path):
    written = course_files.copy_lessons(tmp_path / "course")
    assert [path.name for path in written] == lesson_names()
    for path in written:
        assert path.read_bytes() == (LESSONS_DIR / path.name).read_bytes()


def test_copy_lessons_student_copies_the_exercise_versions(tmp_path):
    written = course_files.copy_lessons(tmp_path, student=True)
    assert [path.name for path in written] == lesson_names()
    student_dir = LESSONS_DIR / notebooks.STUDENT_DIR_NAME
    for path in written:
        assert path.read_bytes() == (student_dir / path.name).read_bytes()


def test_copy_lessons_refuses_to_overwrite_and_copies_nothing(tmp_path):
    mine = tmp_path / lesson_names()[1]
    mine.write_text("my notes")
    with pytest.raises(FileExistsError, match="--force"):
        course_files.copy_lessons(tmp_path)
    assert mine.read_text() == "my notes"
    assert sorted(path.name for path in tmp_path.iterdir()) == [mine.name]


def test_copy_lessons_force_overwrites(tmp_path):
    mine = tmp_path / lesson_names()[0]
    mine.write_text("my notes")
    course_files.copy_lessons(tmp_path, force=True)
    assert mine.read_bytes() == (LESSONS_DIR / mine.name).read_bytes()


def test_copy_lessons_into_a_file_is_an_error(tmp_path):
    target = tmp_path / "course"
    target.write_text("")
    with pytest.raises(NotADirectoryError, match="folder"):
        course_files.copy_lessons(target)


def test_lessons_copy_command(tmp_path, capsys):
    assert main(["lessons", "--copy", str(tmp_path), "--student"]) == 0
    assert f"copied {len(lesson_names())} student notebooks" in capsys.readouterr().out
    assert main(["lessons", "--copy", str(tmp_path), "--student"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["lessons", "--copy", str(tmp_path), "--student", "--force"]) == 0


def test_lessons_copy_options_need_copy(capsys):
    assert main(["lessons", "--student"]) == 2
    assert "--copy" in capsys.readouterr().err


def test_every_committed_result_file_is_package_data():
    names = ("lora_adapters", "lora_adapters_reverse", "lora_tables", "lora_tables_reverse",
             "qlora_table3_reverse", "qlora_table3_shift", "qlora_qv_reverse", "qlora_qv_shift",
             "realtext_asyncio", "lora_learns")
    for name in names:
        results = experiments.load_results(name)
        assert results.get("runs") or results.get("layers")
        path = course_files.shipped_results(f"{name}.json")
        assert Path(str(path)).is_relative_to(Path(str(resources.files("pedaPEFT"))))
    committed = sorted(path.stem for path in (REPO / "pedaPEFT" / "results").glob("*.json"))
    assert committed == sorted(names)


def test_missing_results_name_the_command_that_makes_them():
    with pytest.raises(ValueError, match="lora-experiment nope --scale full"):
        experiments.load_results("lora_nope")


@pytest.mark.parametrize("filename", ["../x.json", "x.txt", None])
def test_shipped_results_rejects_anything_but_a_json_name(filename):
    with pytest.raises(ValueError, match="filename"):
        course_files.shipped_results(filename)


def test_figures_command_writes_under_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["figures", "rank_parameter_counts"]) == 0
    assert (tmp_path / "figures" / "rank_parameter_counts.png").stat().st_size > 0
    assert "wrote figures/rank_parameter_counts.png" in capsys.readouterr().out


@pytest.mark.parametrize("written_for", ["0.2.0", "1.0.0"])
def test_check_version_stops_an_incompatible_package_in_one_line(monkeypatch, written_for):
    monkeypatch.setattr(pedaPEFT, "__version__", "0.1.5")
    with pytest.raises(RuntimeError) as error:
        check_version(written_for)
    message = str(error.value)
    assert "\n" not in message
    assert f"written for pedaPEFT {written_for} but 0.1.5 is installed" in message
    assert f"git+{pedaPEFT.REPOSITORY_URL}@v{written_for}" in message


@pytest.mark.parametrize("written_for", ["0.1.0", "0.1.5", "0.0.9"])
def test_check_version_accepts_the_same_major_version_not_older(monkeypatch, written_for):
    monkeypatch.setattr(pedaPEFT, "__version__", "0.1.5")
    check_version(written_for)
