"""The README's generated parts: runtimes from the test run's record, the memory conventions."""

import importlib.util
import json
import types
from pathlib import Path

import pytest

from pedaPEFT import memory, readme, runtimes

REPO = Path(__file__).resolve().parent.parent


def test_readme_is_what_the_readme_command_writes():
    assert readme.differences() == []


def test_runtime_column_equals_the_recorded_runtimes():
    recorded = runtimes.read()
    rows = [readme.LESSON_ROW.match(line) for line in readme.README.read_text().split("\n")]
    rows = [row for row in rows if row]
    assert len(rows) >= 11
    for row in rows:
        assert row.group(3) == readme.runtime_cell(recorded[row.group(2)]["seconds"]), row.group(0)


FAKE_README = """| # | lesson | what | CPU runtime |
|---|---|---|---|
| 1 | [One](lessons/01_one.ipynb) | a | 5 s |
| 2 | [Two](lessons/02_two.ipynb) | b | 7 s |

<!-- runtimes note: written by python -m pedaPEFT readme -->
old note
<!-- end of runtimes note -->
<!-- memory conventions: written by python -m pedaPEFT readme -->
old table
<!-- end of memory conventions -->
"""


def test_render_writes_the_recorded_seconds_and_the_conventions():
    recorded = {"01_one": {"seconds": 12.4, "cpus": 2, "load": 3.0},
                "02_two": {"seconds": 0.2, "cpus": 2, "load": 5.0}}
    text = readme.render(FAKE_README, recorded)
    assert "| 1 | [One](lessons/01_one.ipynb) | a | 12 s |" in text
    assert "| 2 | [Two](lessons/02_two.ipynb) | b | 1 s |" in text
    assert memory.conventions_table(markdown=True) in text and "old table" not in text
    assert "2-core CPU" in text and "3.0–5.0" in text and "old note" not in text
    assert readme.render(text, recorded) == text
    with pytest.raises(ValueError, match="markers"):
        readme.render("no markers here", recorded)


def test_record_keeps_other_lessons_and_refuses_bad_numbers(tmp_path):
    path = tmp_path / "runtimes.json"
    runtimes.record({"01_one": 5.04}, {"01_one": 2.0}, path)
    runtimes.record({"02_two": 7.0}, {"02_two": 1.0}, path)
    runtimes.record({"01_one": 6.0}, {"01_one": 2.5}, path)
    lessons = json.loads(path.read_text())["lessons"]
    assert {name: entry["seconds"] for name, entry in lessons.items()} == {"01_one": 6.0,
                                                                           "02_two": 7.0}
    assert [p.name for p in tmp_path.iterdir()] == ["runtimes.json"]  # no temporary left over
    for bad in (float("nan"), -1.0, True):
        with pytest.raises(ValueError, match="finite numbers >= 0"):
            runtimes.record({"01_one": bad}, {}, path)
        with pytest.raises(ValueError, match="finite numbers >= 0"):  # next to a good load
            runtimes.record({"01_one": bad}, {"01_one": 1.0}, path)


def _load_root_conftest():
    spec = importlib.util.spec_from_file_location("root_conftest", REPO / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recorder_adds_up_each_notebook_and_skips_failed_ones(tmp_path):
    recorder = _load_root_conftest().RuntimeRecorder(tmp_path / "runtimes.json")
    reports = [("lessons/01_one.ipynb::Cell 0", 2.0, False),
               ("lessons/01_one.ipynb::Cell 1", 1.5, False),
               ("lessons/02_two.ipynb::Cell 0", 1.0, True),
               ("tests/test_memory.py::test_x", 9.0, False)]
    for nodeid, duration, failed in reports:
        recorder.pytest_runtest_logreport(
            types.SimpleNamespace(nodeid=nodeid, duration=duration, failed=failed))
    recorder.pytest_sessionfinish(session=None)
    assert runtimes.read(tmp_path / "runtimes.json")["01_one"]["seconds"] == 3.5
    assert set(runtimes.read(tmp_path / "runtimes.json")) == {"01_one"}


def _row(lesson_claim: str) -> str:
    rows = [line for line in readme.README.read_text().split("\n")
            if line.startswith("| ") and lesson_claim in line]
    assert len(rows) == 1, lesson_claim
    return rows[0]


def test_errata_memory_figures_come_from_the_conventions():
    """The errata's memory figures, recomputed from memory.CONVENTIONS and the GB unit."""
    gb = memory.GB
    conventions = memory.CONVENTIONS
    llama8b = memory.llama_parameter_count(**memory.LLAMA3_8B)
    full = conventions["full"].memory(llama8b).static
    adam8 = conventions["full, 8-bit Adam"].memory(llama8b).static
    assert f"{conventions['full, 8-bit Adam'].bytes_per_trainable():.2f} bytes per parameter" in (
        _row("regular 8bit Adam"))
    assert f"{adam8 / gb:.1f} GB" in _row("regular 8bit Adam")
    assert f"**{full / gb:.1f} GB**" in _row("16 bytes per trainable parameter")
    a40 = memory.gpu_card_bytes(48)
    spare = (3 * a40 - full) / 3
    assert f"about {spare / gb:.1f} GB of each 48 GiB card" in _row("at least 3 A40s")
    row = _row("LLaMA-3-70B model with 32-bit precision")
    seventy = 70 * 10**9
    assert f"**{conventions['full'].memory(seventy).static / gb:,.0f} GB** at 16 B/param" in row
    no_master = conventions["full, no master copy"]
    assert f"{no_master.memory(seventy).static / gb:,.0f} GB without the master copy" in row
    assert no_master.memory(65 * 10**9).static / gb == 780
    row = _row("memory per trainable parameter is 8.5 bytes")
    assert f"**{conventions['lora'].bytes_per_trainable():.0f} bytes**" in row
    assert f"**{conventions['qlora'].bytes_per_trainable() * 48e6 / gb:.3f} GB**" in (
        _row("8.5 bytes × 48 million"))
    d, kv, ffn, layers = 4096, 1024, 14336, 32
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * ffn)
    base = conventions["qlora"].memory(llama8b, 0, quantized=linear).static
    assert f"**{base / gb:.2f} GB**" in _row("the 4-bit LLaMA-3-8B base")
    card = memory.gpu_card_bytes(24)
    assert f"24 GiB = {card / gb:.1f} GB" in _row("states that this mechanism is necessary")
