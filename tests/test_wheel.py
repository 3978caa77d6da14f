"""The course runs from an installed wheel, with no repository in sight (Colab, JupyterHub).

The wheel is built from a copy of the project's sources and installed, not editable, into a
fresh virtual environment in a temporary folder: PyTorch first (the version this suite runs
with), then the wheel with its ``lessons``, ``test`` and ``reference`` extras (lesson 12 uses
transformers, PEFT and bitsandbytes). ``python -m pedaPEFT lessons
--copy`` copies the lessons into an empty folder, and strict nbval runs them there with the
environment's own Python, so nothing can come from the checkout. Then pedaPEFT (and ipywidgets,
which a bare Jupyter kernel may lack) is removed from that environment and lesson 3 runs again:
its first cell must install pedaPEFT from the wheel named by ``PEDAPEFT_INSTALL_SOURCE``.

Marked ``wheel`` (a few minutes on a 2-core CPU); ``python -m pytest -m "not wheel"`` leaves it out.
"""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import pedaPEFT
from pedaPEFT import course_files, notebooks

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "README.md", "pedaPEFT", "lessons")
SANITIZE_FILE = ROOT / "tests" / "nbval_sanitize.cfg"
NOT_INSTALLED_LESSON = "01_matrix_rank.ipynb"
STEP_TIMEOUT_S = 1800


def run(command: list, cwd: Path, env: dict | None = None) -> str:
    """Run a command; fail the test with its output if it fails. Return its stdout."""
    done = subprocess.run([str(part) for part in command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False)
    assert done.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({done.returncode}):\n"
        f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    )
    return done.stdout


def clean_environment(venv: Path) -> dict:
    """This process's environment, ``venv`` first on PATH, nothing pointing at the checkout."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONNOUSERSITE"] = "1"
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, course folder, wheel, environment) after the build, install and copy."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
        else:
            shutil.copy2(path, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", source, "-w", work / "dist"],
        cwd=work)
    (wheel,) = (work / "dist").glob("pedapeft-*.whl")

    venv = work / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=work)
    python = venv / "bin" / "python"
    env = clean_environment(venv)
    torch_version = torch.__version__.split("+")[0]
    pip_install = [python, "-m", "pip", "install", "--quiet", "--no-compile"]
    run([*pip_install, f"torch=={torch_version}"], cwd=work, env=env)
    run([*pip_install, f"{wheel}[lessons,test,reference]"], cwd=work, env=env)  # lesson 12

    course = work / "course"
    course.mkdir()
    where = run([python, "-c", "import pedaPEFT; print(pedaPEFT.__file__)"], cwd=course, env=env)
    assert Path(where.strip()).is_relative_to(venv), f"pedaPEFT imported from {where}"
    run([python, "-m", "pedaPEFT", "lessons", "--copy", "."], cwd=course, env=env)
    shutil.copy2(SANITIZE_FILE, course / SANITIZE_FILE.name)
    return python, course, wheel, env


def run_nbval(python: Path, course: Path, notebooks_to_run: list[str], env: dict) -> str:
    """Strict nbval on notebooks in ``course``, with the environment's Python and no checkout."""
    return run([python, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", course,
                "--confcutdir", course, "--nbval", "--nbval-current-env",
                "--nbval-sanitize-with", SANITIZE_FILE.name, "--nbval-cell-timeout", "600",
                *notebooks_to_run], cwd=course, env=env)


def test_the_wheel_ships_every_lesson(installed):
    _, course, _, _ = installed
    copied = sorted(path.name for path in course.glob(course_files.LESSON_PATTERN))
    expected = [source.with_suffix(".ipynb").name for source in notebooks.lesson_sources()]
    assert copied == expected


def test_every_lesson_passes_from_the_installed_wheel(installed):
    python, course, _, env = installed
    names = sorted(path.name for path in course.glob(course_files.LESSON_PATTERN))
    # One nbval run per notebook, two at a time: each kernel mostly keeps one core busy.
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = list(pool.map(lambda name: run_nbval(python, course, [name], env), names))
    output = "\n".join(outputs)
    for name in names:
        assert name in output, f"{name} did not run:\n{output[-3000:]}"
    assert " passed" in output and "failed" not in output


def test_the_first_cell_installs_pedapeft_where_it_is_missing(installed):
    python, course, wheel, env = installed
    run([python, "-m", "pip", "uninstall", "--quiet", "--yes", "pedapeft", "ipywidgets"],
        cwd=course, env=env)
    missing = subprocess.run([python, "-c", "import pedaPEFT"], cwd=course, env=env,
                             capture_output=True, text=True, check=False)
    assert missing.returncode != 0, "pedaPEFT is still importable after uninstalling it"
    output = run_nbval(python, course, [NOT_INSTALLED_LESSON],
                       {**env, notebooks.INSTALL_SOURCE_VARIABLE: str(wheel)})
    assert NOT_INSTALLED_LESSON in output and "failed" not in output
    version = run([python, "-c", "import pedaPEFT; print(pedaPEFT.__version__)"], cwd=course,
                  env=env)
    assert version.strip() == pedaPEFT.__version__
