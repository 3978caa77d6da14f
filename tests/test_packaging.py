"""The install story holds together: pyproject.toml, environment.yml, README and CI agree."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name


def requirement_pair(requirement: str) -> tuple[str, str]:
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(.*?)\s*", requirement)
    assert match, requirement
    return match.group(1).lower(), match.group(2).replace(" ", "")


def pyproject_requirements() -> set[tuple[str, str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += [r for r in extra if not r.startswith("pedapeft")]
    return {requirement_pair(r) for r in requirements}


def environment_requirements() -> set[tuple[str, str]]:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pairs = set()
    for entry in environment["dependencies"]:
        if isinstance(entry, dict):
            pairs |= {requirement_pair(r) for r in entry["pip"] if not r.startswith("--editable")}
        elif entry not in ("pip",) and not entry.startswith("python>="):
            pairs.add(requirement_pair(entry))
    return pairs


def test_environment_yml_installs_what_pyproject_declares():
    expected = {(CONDA_NAMES.get(name, name), spec) for name, spec in pyproject_requirements()}
    assert environment_requirements() == expected


def test_environment_yml_installs_the_package_itself():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(
        entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict)
    )
    assert "--editable ." in pip_section


def quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_quickstart_has_two_commands_and_ci_runs_the_test_command():
    setup, test = quickstart_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == test, "CI must end with exactly the README's test command"
    install = re.search(r"python -m pip install -e \"\.\[all\]\"", setup)
    assert install and install.group(0) in ci_lines
    assert setup.endswith("python -m pedaPEFT demo")


def test_torch_requirement_is_a_range():
    torch_spec = dict(pyproject_requirements())["torch"]
    assert ">=" in torch_spec and "==" not in torch_spec
