"""Helpers every lesson calls in its first cell: version check and seeding.

A lesson is written against one version of the package. ``check_version`` stops a lesson
early, with a clear message, when the installed package is older than the lesson or of a
different major version, instead of failing later with a confusing ``AttributeError``.
"""

import random

import numpy as np
import torch

import pedaPEFT


def _parse(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise ValueError(
            f"version must look like 'MAJOR.MINOR.PATCH' with integers, got {version!r}"
        ) from None


def check_version(written_for: str) -> None:
    """Raise if the installed pedaPEFT cannot run a lesson written for ``written_for``.

    Compatible means: same major version, and installed >= written_for. The error is one line
    that says which version to install and how.
    """
    wanted, installed = _parse(written_for), _parse(pedaPEFT.__version__)
    if installed[0] != wanted[0] or installed < wanted:
        raise RuntimeError(
            f"this lesson was written for pedaPEFT {written_for} but {pedaPEFT.__version__} is "
            f"installed: python -m pip install \"git+{pedaPEFT.REPOSITORY_URL}@v{written_for}\" "
            "(in a clone of the course: python -m pip install -e .), then restart the kernel"
        )


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators with ``seed``.

    Lessons also make their own ``np.random.default_rng(seed)`` where they need one; this call
    fixes everything that draws from the global state (``torch.randn``, module initialisers).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (the legacy global state is what old code draws from)
    torch.manual_seed(seed)
