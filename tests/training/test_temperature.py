"""Temperature scaling: the fit recovers a known temperature; ECE and the reliability diagram."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.temperature import (
    expected_calibration_error,
    fit_temperature,
    nll,
    plot_reliability,
    reliability,
    softmax,
)


def synthetic(t_true: float, n: int = 20_000, k: int = 10, seed: int = 0):
    """Logits z and labels drawn from softmax(z / t_true): t_true is the calibrated answer."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, (n, k))
    p = softmax(z, t_true)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, labels


@pytest.mark.parametrize("t_true", [0.3, 1.0, 2.5, 8.0])
def test_the_fit_recovers_a_known_temperature(t_true: float) -> None:
    z, y = synthetic(t_true)
    t = fit_temperature(z, y)
    assert abs(t - t_true) / t_true < 0.05, (t, t_true)
    # It is the NLL minimum: nudging T either way does worse.
    assert nll(z, y, t) <= min(nll(z, y, t * 1.05), nll(z, y, t / 1.05))


def test_tempering_lowers_the_calibration_error_of_miscalibrated_logits() -> None:
    z, y = synthetic(4.0, seed=1)  # softmax(z) is far too confident for these labels
    zt, yt = synthetic(4.0, seed=2)  # held-out "test" split
    t = fit_temperature(z, y)
    before = expected_calibration_error(zt, yt)
    after = expected_calibration_error(zt, yt, t)
    assert before > 0.15 and after < 0.02, (before, after)


def test_ece_by_hand() -> None:
    # Two images, two classes: confidence 0.85 (right) and 0.65 (wrong).
    z = np.log(np.array([[0.85, 0.15], [0.65, 0.35]]))
    y = np.array([0, 1])
    r = reliability(z, y, bins=10)  # separate bins: |1 - 0.85| and |0 - 0.65|, half each
    assert list(np.flatnonzero(r.count)) == [6, 8]
    assert r.ece == pytest.approx((0.15 + 0.65) / 2)
    r = reliability(z, y, bins=2)  # one bin (0.5, 1]: |0.5 - 0.75|
    assert list(r.count) == [0, 2] and r.ece == pytest.approx(0.25)


def test_the_reliability_diagram_is_written(tmp_path: Path) -> None:
    z, y = synthetic(2.0, n=2000)
    path = plot_reliability(z, y, fit_temperature(z, y), tmp_path / "rel.png", "synthetic")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="need logits"):
        fit_temperature(np.zeros((3, 2)), np.zeros(4, dtype=int))
