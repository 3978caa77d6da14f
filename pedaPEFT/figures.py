"""Every figure of the course, one function each, and the command that writes them all.

A figure function builds its plot from the package (or from a small committed results file in
``figures/data/``) and returns the ``Figure``; it never writes files. Lessons call the same
functions to show the figures, so a figure in ``figures/`` is exactly what the lesson shows.
``python -m pedaPEFT figures`` calls every registered function and writes ``figures/<name>.png``.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

FigureFunction = Callable[[], Figure]
FIGURES: dict[str, FigureFunction] = {}
DATA_DIR = Path(__file__).resolve().parent.parent / "figures" / "data"

STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "font.size": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
matplotlib.rcParams.update(STYLE)


def register(name: str) -> Callable[[FigureFunction], FigureFunction]:
    """Decorator: list a figure function under ``name`` (the PNG is ``figures/<name>.png``)."""

    def decorator(function: FigureFunction) -> FigureFunction:
        if name in FIGURES:
            raise ValueError(f"figure name {name!r} is registered twice")
        FIGURES[name] = function
        return function

    return decorator


def save_figure(figure: Figure, path: Path) -> None:
    """Write ``figure`` as a PNG atomically, without a timestamp or software tag in the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png", metadata={"Software": None})
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_figures(out_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Regenerate the named figures (all when ``names`` is None) into ``out_dir``."""
    import matplotlib.pyplot as plt

    names = sorted(FIGURES) if names is None else names
    unknown = [name for name in names if name not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure names {unknown}; available: {sorted(FIGURES)}")
    written = []
    for name in names:
        figure = FIGURES[name]()
        save_figure(figure, out_dir / f"{name}.png")
        plt.close(figure)
        written.append(out_dir / f"{name}.png")
    return written
