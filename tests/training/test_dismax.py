"""DisMax: head, loss and mosaic regularization against small hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.head import DisMaxHead, make_head
from training.loss import DisMaxLoss, make_loss, mosaic, mosaic_targets
from training.scores import SCORES, mmles, scores_for


def _head() -> DisMaxHead:
    head = DisMaxHead(2, 3)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]]))
        head.distance_scale.fill_(-2.0)  # |d_s| = 2: the sign must not matter
    return head


def test_head_logits_add_the_mean_distance():
    # f = (5, 0) -> f̂ = (1, 0); unit distances to p̂ = (1,0), (0,1), (-1,0): 0, √2, 2.
    logits, d = _head().logits_and_distances(torch.tensor([[5.0, 0.0]]))
    iso = [2 * 0 / math.sqrt(2), 2 * math.sqrt(2) / math.sqrt(2), 2 * 2 / math.sqrt(2)]
    mean = sum(iso) / 3  # (0 + 2 + 2√2) / 3
    np.testing.assert_allclose(d.detach().numpy(), [[0.0, math.sqrt(2), 2.0]], atol=1e-6)
    np.testing.assert_allclose(logits.detach().numpy(), [[-(v + mean) for v in iso]], atol=1e-6)
    assert make_head("dismax", 2, 3).__class__ is DisMaxHead


def test_loss_without_mosaics_is_entropic_cross_entropy():
    z = torch.tensor([[-1.0, -1.2, -3.0], [-0.5, -0.4, -2.0]])
    y = torch.tensor([1, 0])
    want = 0.0
    for row, t in zip(z.tolist(), y.tolist(), strict=True):
        e = [math.exp(10 * v) for v in row]
        want += -math.log(e[t] / sum(e)) / 2
    assert float(DisMaxLoss()(z, y)) == pytest.approx(want, rel=1e-6)


def test_regularized_loss_by_hand():
    z = torch.tensor([[-1.0, -1.2, -3.0], [-0.5, -0.4, -2.0], [-1.0, -1.1, -1.3], [-2, -1.0, -1.5]])
    targets = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [0.0, 0.5, 0.5]])

    def p(row: list[float]) -> list[float]:
        e = [math.exp(10 * v) for v in row]
        return [v / sum(e) for v in e]

    ce = (-math.log(p(z[0].tolist())[1]) - math.log(p(z[1].tolist())[0])) / 2
    kl = 0.0
    for i in (2, 3):
        q = p(z[i].tolist())
        kl += (
            sum(t * math.log(t / qi) for t, qi in zip(targets[i].tolist(), q, strict=True) if t > 0)
            / 2
        )
    got = DisMaxLoss(alpha=1.0)(z, targets)
    assert float(got) == pytest.approx((ce + kl) / 2, rel=1e-5)
    got3 = DisMaxLoss(alpha=3.0)(z, targets)
    assert float(got3) == pytest.approx((ce + 3 * kl) / 2, rel=1e-5)


def test_mosaic_quadrants_come_from_the_three_previous_images():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 2, 6, 8).clone()
    m = mosaic(x)
    assert m.shape == x.shape
    for i in range(4):
        assert (m[i, :, :3, :4] == i).all()  # top-left: itself
        assert (m[i, :, 3:, :4] == (i - 1) % 4).all()  # bottom-left
        assert (m[i, :, :3, 4:] == (i - 2) % 4).all()  # top-right
        assert (m[i, :, 3:, 4:] == (i - 3) % 4).all()  # bottom-right
    assert (x[:, :, 0, 0] == torch.arange(4.0)[:, None]).all()  # the input is left alone


def test_mosaic_targets_put_a_quarter_on_each_source_class():
    t = mosaic_targets(torch.tensor([0, 0, 1, 2, 2]), 3)
    # row i's sources are images i, i-1, i-2, i-3 (mod 5): row 0 <- images 0, 4, 3, 2
    np.testing.assert_allclose(
        t.numpy(),
        [
            [0.25, 0.25, 0.5],  # labels 0, 2, 2, 1
            [0.5, 0.0, 0.5],  # 0, 0, 2, 2
            [0.5, 0.25, 0.25],  # 1, 0, 0, 2
            [0.5, 0.25, 0.25],  # 2, 1, 0, 0
            [0.25, 0.25, 0.5],  # 2, 2, 1, 0
        ],
    )
    np.testing.assert_allclose(t.sum(1).numpy(), 1.0)


def test_prepare_mosaics_the_second_half_only():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 3, 1])
    mx, t = DisMaxLoss().prepare(x, y, 4)
    assert mx.shape == x.shape and t.shape == (5, 4)
    assert torch.equal(mx[:2], x[:2]) and torch.equal(mx[2:], mosaic(x[2:]))
    np.testing.assert_allclose(t[:2].numpy(), np.eye(4)[[0, 1]])
    np.testing.assert_allclose(t[2:].numpy(), mosaic_targets(y[2:], 4).numpy())
    plain_x, plain_y = DisMaxLoss(regularization=False).prepare(x, y, 4)
    assert plain_x is x and plain_y is y


def test_gradients_reach_the_head_and_stay_finite():
    torch.manual_seed(0)
    head = DisMaxHead(8, 4)
    feats = torch.randn(6, 8, requires_grad=True)
    feats_with_zero_distance = torch.cat([feats, head.prototypes.detach()[:1]])
    loss_fn = make_loss("dismax")
    _, t = loss_fn.prepare(torch.rand(7, 1, 4, 4), torch.tensor([0, 1, 2, 3, 0, 1, 0]), 4)
    loss = loss_fn(head(feats_with_zero_distance), t)
    loss.backward()
    assert torch.isfinite(loss)
    for p in (head.prototypes, head.distance_scale, feats):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_mmles_score():
    z = np.array([[-1.0, -2.0, -3.0]])
    p = np.exp(z) / np.exp(z).sum()
    want = -1.0 + -2.0 + (p * np.log(p)).sum()
    np.testing.assert_allclose(mmles(z), [want])
    assert scores_for("dismax")[0] == "mmles" and "mmles" in SCORES
