"""The package's layers (ARCHITECTURE.md) hold: import-linter's contract, every module placed
in it, no module over 500 lines, and the fine-tuning registry complete on import. Docstrings
that point to a lesson name a section heading that exists in that lesson's script, and every
public function or class a lesson uses points to its lesson."""

import ast
import re
import subprocess
import sys
import sysconfig
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pedaPEFT"
MAX_LINES = 500
INTRODUCED = re.compile(r"Introduced in lesson (\d+)(,\s+section\s+\"(.+?)\"[.;])?", re.DOTALL)
PROSE_REFERENCE = re.compile(r"`(?:pedaPEFT\.)?(\w+)\.(\w+)")  # `quant.nf4_code` in markdown


def contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return contract["layers"]


def classified_modules() -> set[str]:
    names = set()
    for layer in contract_layers():
        for sibling in layer.replace("|", ":").split(":"):
            names.add(sibling.strip().strip("()"))
    return names


def test_lint_imports_keeps_the_layers_contract():
    script = Path(sysconfig.get_path("scripts")) / "lint-imports"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "importlinter.cli"]
    done = subprocess.run([*command, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_every_module_is_placed_in_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}  # subpackages
    unplaced = sorted(modules - classified_modules())
    assert not unplaced, (
        f"modules {unplaced} are in no layer of [tool.importlinter] in pyproject.toml; add each "
        "to the layer it belongs to (and a line to ARCHITECTURE.md)"
    )


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_longer_than_the_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it by concept"


def test_lora_finetunes_after_importing_only_gpt_and_train():
    code = (
        "from pedaPEFT import gpt, train\n"
        "config = train.TrainConfig(steps=1, batch_size=8, progress=False)\n"
        "result = train.finetune(gpt.load_pretrained('tiny'), 'shift', 'lora', config,"
        " n_train=8)\n"
        "print(sorted(train.METHODS), result.method, result.trainable)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    methods, method, trainable = done.stdout.rsplit(" ", 2)
    assert methods == "['adapter', 'bitfit', 'feature', 'full', 'lora', 'prefix', 'qlora', 'top']"
    assert method == "lora" and int(trainable) > 0


def lesson_headings(number: int) -> set[str]:
    (script,) = (ROOT / "lessons").glob(f"{number:02d}_*.py")
    return {m.group(1) for m in re.finditer(r"^# #+ (.+)$", script.read_text(), re.MULTILINE)}


def lesson_pointers() -> list[tuple[str, int, str | None]]:
    """``(where, lesson, section)`` for every "Introduced in lesson N[, section "H"]" in a
    docstring of ``pedaPEFT/`` (the section's whitespace collapsed, as a wrapped line reads)."""
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                continue
            for m in INTRODUCED.finditer(ast.get_docstring(node) or ""):
                section = None if m.group(3) is None else " ".join(m.group(3).split())
                section = section and section.replace("\\\\", "\\")  # reST writes a backslash as \\
                found.append((f"{path.name}:{getattr(node, 'name', '')}", int(m.group(1)), section))
    return found


def test_lesson_pointers_name_a_section_of_that_lesson():
    pointers = lesson_pointers()
    assert len(pointers) >= 50, "the docstrings lost their lesson pointers"
    headings = {n: lesson_headings(n) for n in {lesson for _, lesson, _ in pointers}}
    wrong = [(where, lesson, section) for where, lesson, section in pointers
             if section not in headings[lesson]]
    assert not wrong, (
        f"these docstrings name no heading of their lesson's script: {wrong}; write "
        '\'Introduced in lesson N, section "<heading as in lessons/NN_*.py>".\''
    )


@cache
def definitions(module: str) -> dict[str, tuple[str, str]]:
    """``{name: (defining module, docstring)}`` for the top-level functions and classes of
    ``pedaPEFT/<module>.py``, and for those it imports from another pedaPEFT module (so that
    ``quant.nf4_code`` is traced to ``quant_4bit``)."""
    path = PACKAGE / f"{module}.py"
    if not path.exists():
        return {}
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            found[node.name] = (module, ast.get_docstring(node) or "")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pedaPEFT."):
            source = definitions(node.module.removeprefix("pedaPEFT."))
            found |= {a.asname or a.name: source[a.name] for a in node.names if a.name in source}
    return found


def lesson_uses() -> dict[tuple[str, str], set[int]]:
    """``{(defining module, name): lessons}`` for every public function or class of the package
    that a lesson script uses: ``module.name`` on a module of ``from pedaPEFT import module``,
    ``from pedaPEFT.module import name``, or a `` `module.name` `` its text refers the reader to."""
    uses: dict[tuple[str, str], set[int]] = {}
    for script in sorted((ROOT / "lessons").glob("[0-9][0-9]_*.py")):
        text = script.read_text()
        tree = ast.parse(text)
        modules, names = {}, []
        names += PROSE_REFERENCE.findall("\n".join(re.findall(r"^#.*$", text, re.MULTILINE)))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "pedaPEFT":
                modules |= {a.asname or a.name: a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pedaPEFT."):
                names += [(node.module.removeprefix("pedaPEFT."), a.name) for a in node.names]
        names += [(modules[node.value.id], node.attr) for node in ast.walk(tree)
                  if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                  and node.value.id in modules]
        for module, name in names:
            if not name.startswith("_") and name in definitions(module):
                defining, _ = definitions(module)[name]
                uses.setdefault((defining, name), set()).add(int(script.name[:2]))
    return uses


def test_every_function_a_lesson_uses_points_to_its_lesson():
    uses = lesson_uses()
    assert ("quant_4bit", "nf4_code") in uses and ("exercises", "check") in uses, (
        "the scan of the lessons no longer sees their calls into the package")
    missing, late = [], []
    for (module, name), lessons in sorted(uses.items()):
        pointer = INTRODUCED.search(definitions(module)[name][1])
        if pointer is None or pointer.group(3) is None:
            missing.append(f"{module}.{name} (lessons {sorted(lessons)})")
        elif int(pointer.group(1)) > min(lessons):
            late.append(f"{module}.{name} says lesson {pointer.group(1)}, used in {min(lessons)}")
    assert not missing, (
        f"these are used by lessons but their docstrings do not say where: {missing}; end each "
        'with \'Introduced in lesson N, section "<heading as in lessons/NN_*.py>".\''
    )
    assert not late, f"these point to a lesson after the first one that uses them: {late}"
