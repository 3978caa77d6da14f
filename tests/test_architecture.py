"""The package's layers (ARCHITECTURE.md) hold: import-linter's contract, every module placed
in it, no module over 500 lines, and the fine-tuning registry complete on import."""

import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pedaPEFT"
MAX_LINES = 500


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
    unplaced = sorted(modules - classified_modules())
    assert not unplaced, (
        f"modules {unplaced} are in no layer of [tool.importlinter] in pyproject.toml; add each "
        "to the layer it belongs to (and a line to ARCHITECTURE.md)"
    )


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.name)
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
    assert methods == "['adapter', 'feature', 'full', 'lora', 'qlora', 'top']"
    assert method == "lora" and int(trainable) > 0
