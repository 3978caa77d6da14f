"""``python -m pedaPEFT figures`` regenerates every committed PNG, within a small tolerance."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest
from matplotlib.testing.compare import compare_images

from pedaPEFT import figures

FIGURES_DIR = Path(__file__).resolve().parent.parent / "figures"
TOLERANCE = 2.0  # RMS difference of pixel values (0-255), matplotlib's image comparison


def test_every_committed_png_has_a_figure_function_and_back():
    committed = {path.stem for path in FIGURES_DIR.glob("*.png")}
    assert committed == set(figures.FIGURES)


@pytest.mark.parametrize("name", sorted(figures.FIGURES))
def test_figure_regenerates_like_the_committed_one(name, tmp_path):
    (written,) = figures.write_figures(tmp_path, [name])
    difference = compare_images(str(FIGURES_DIR / f"{name}.png"), str(written), tol=TOLERANCE)
    assert difference is None, difference


def test_unknown_figure_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown figure names"):
        figures.write_figures(tmp_path, ["no_such_figure"])
