"""``python -m pedaPEFT env``: one line per requirement, non-zero exit on any failure."""

import importlib.metadata
import subprocess
import sys

from pedaPEFT import envcheck


def test_env_command_passes_here():
    result = subprocess.run(
        [sys.executable, "-m", "pedaPEFT", "env"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split("]")[1].split(":")[0].strip() for line in result.stdout.splitlines()[:-1]]
    assert names == [
        "python",
        "numpy",
        "scipy",
        "torch",
        "matplotlib",
        "tqdm",
        "safetensors",
        "jupyter kernel",
        "jupytext",
        "nbformat",
        "nbclient",
        "nbval",
        "pedaPEFT",
    ]
    assert all(line.startswith("[OK]") for line in result.stdout.splitlines()[:-1])


def test_missing_package_fails(monkeypatch, capsys):
    real_version = importlib.metadata.version

    def version(name):
        if name == "nbval":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert envcheck.main() == 1
    assert "[FAIL] nbval: not installed" in capsys.readouterr().out


def test_too_old_package_fails(monkeypatch, capsys):
    monkeypatch.setattr(envcheck, "declared_minimums", lambda: {"numpy": "999.0"})
    assert envcheck.main() == 1
    assert "[FAIL] numpy" in capsys.readouterr().out


def test_minimums_come_from_the_package_metadata():
    minimums = envcheck.declared_minimums()
    assert {"numpy", "scipy", "torch", "matplotlib", "tqdm"} <= set(minimums)
