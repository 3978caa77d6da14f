"""``python -m pedaPEFT env``: is this machine ready for the course?

One line per requirement, ``[OK]`` or ``[FAIL]``; the minimum versions come from the package's
own metadata (``pyproject.toml``), so this check and the install can never disagree.
"""

import importlib
import importlib.metadata
import platform
import re
import sys
from dataclasses import dataclass

MINIMUM_PYTHON = (3, 11)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"[{'OK' if self.ok else 'FAIL'}] {self.name}: {self.detail}"


def _release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: '2.13.0+cpu' -> (2, 13, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def declared_minimums() -> dict[str, str]:
    """``{distribution: minimum version}`` from the installed pedapeft's requirements."""
    minimums = {}
    for requirement in importlib.metadata.requires("pedapeft") or []:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*\[?[^>;]*>=\s*([0-9.]+)", requirement)
        if match:
            minimums.setdefault(match.group(1).lower(), match.group(2))
    return minimums


def _check_distribution(distribution: str, minimums: dict[str, str]) -> Check:
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return Check(distribution, False, "not installed (python -m pip install -e '.[all]')")
    minimum = minimums.get(distribution)
    if minimum and _release(version) < _release(minimum):
        return Check(distribution, False, f"{version} installed, >= {minimum} required")
    return Check(distribution, True, version + (f" (>= {minimum})" if minimum else ""))


def _check_torch(minimums: dict[str, str]) -> Check:
    check = _check_distribution("torch", minimums)
    if not check.ok:
        return check
    import torch

    if torch.cuda.is_available():
        device = f"CUDA {torch.version.cuda} usable on {torch.cuda.get_device_name(0)}"
    elif torch.version.cuda:
        device = f"CUDA {torch.version.cuda} build, but no usable GPU: lessons run on the CPU"
    else:
        device = "CPU build: lessons run on the CPU"
    return Check("torch", True, f"{check.detail}; {device}")


def _check_kernel() -> Check:
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return Check("jupyter kernel", False, "jupyter_client missing (install the lessons extra)")
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        return Check("jupyter kernel", False, "no 'python3' kernel (install ipykernel)")
    return Check("jupyter kernel", True, f"python3 -> {spec.display_name}")


def run_checks() -> list[Check]:
    """Every check, in the order they are printed."""
    minimums = declared_minimums()
    python_ok = sys.version_info[:2] >= MINIMUM_PYTHON
    checks = [
        Check(
            "python",
            python_ok,
            f"{platform.python_version()} (>= {'.'.join(map(str, MINIMUM_PYTHON))})",
        )
    ]
    for distribution in ("numpy", "scipy"):
        checks.append(_check_distribution(distribution, minimums))
    checks.append(_check_torch(minimums))
    for distribution in ("matplotlib", "tqdm", "safetensors"):
        checks.append(_check_distribution(distribution, minimums))
    checks.append(_check_kernel())
    # What ``python -m pedaPEFT lessons`` imports to build notebooks, and what verifies them.
    for distribution in ("jupytext", "nbformat", "nbclient", "nbval"):
        checks.append(_check_distribution(distribution, minimums))
    import pedaPEFT

    checks.append(Check("pedaPEFT", True, pedaPEFT.__version__))
    return checks


def main() -> int:
    """Print the checks; return 0 when all pass, 1 otherwise."""
    checks = run_checks()
    for check in checks:
        print(check.line())
    failed = [check.name for check in checks if not check.ok]
    if failed:
        print(f"{len(failed)} requirement(s) failed: {', '.join(failed)}")
        return 1
    print("Everything the course needs is here.")
    return 0
