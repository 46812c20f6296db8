"""Figures are written as real, non-trivial PNGs, and bad input is refused before drawing."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from training.plots import plot_fig1_grid, plot_roc_curves, plot_score_histograms

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert len(data) > 5000  # axes, text and bars, not an empty canvas
    return width, height


@pytest.fixture
def scores() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 1.0, 500), {
        "mnist": rng.normal(-2.0, 1.0, 300),
        "noise": rng.normal(-4.0, 0.5, 200),
    }


def test_histograms(tmp_path: Path, scores: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
    s_in, s_out = scores
    path = plot_score_histograms(s_in, s_out, "MDS", "-min distance", tmp_path / "sub" / "h.png")
    assert path == tmp_path / "sub" / "h.png"  # parent created
    assert _png_size(path) == (768, 480)  # 6.4 x 4.0 in at 120 dpi


def test_histograms_of_constant_values(tmp_path: Path) -> None:
    path = plot_score_histograms(np.zeros(5), {"x": np.zeros(3)}, "t", "x", tmp_path / "c.png")
    _png_size(path)


def test_roc_curves(tmp_path: Path, scores: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
    s_in, s_out = scores
    _png_size(plot_roc_curves(s_in, s_out, "ES", tmp_path / "roc.png"))


def test_fig1_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)

    def pair(shift: float) -> tuple[np.ndarray, np.ndarray]:
        return rng.gamma(2.0, 0.2, 400), rng.gamma(2.0, 0.2, 300) + shift

    panels = {
        "IsoMax": {"entropy": pair(0.5), "minimum distance": pair(0.0)},
        "IsoMax+": {"entropy": pair(0.5), "minimum distance": pair(0.6)},
    }
    path = plot_fig1_grid(panels, tmp_path / "fig1.png", ood_name="MNIST", title="Fig. 1")
    width, height = _png_size(path)
    assert width > height  # two columns of 4.2 in, two rows of 3.2 in


def test_fig1_grid_rows_must_share_columns(tmp_path: Path) -> None:
    a = (np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"panels\['IsoMax\+'\] has quantities \['entropy'\]"):
        plot_fig1_grid(
            {"IsoMax": {"entropy": a, "distance": a}, "IsoMax+": {"entropy": a}},
            tmp_path / "x.png",
        )
    assert not (tmp_path / "x.png").exists()


def test_bad_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="scores_out is empty"):
        plot_roc_curves(np.ones(3), {}, "t", tmp_path / "r.png")
    with pytest.raises(ValueError, match="svhn must be non-empty and finite"):
        plot_score_histograms(
            np.ones(3), {"svhn": np.array([np.nan])}, "t", "x", tmp_path / "h.png"
        )
