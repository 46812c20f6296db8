"""The IsoMax+ head and loss against a float64 evaluation of the paper's formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.head import IsoMaxHead, IsoMaxPlusHead, make_head, unit_distances
from training.loss import ENTROPIC_SCALE, IsoMaxPlusLoss


def paper_loss_float64(features, prototypes, ds, targets, es=ENTROPIC_SCALE):
    """Eq. (3) written out literally in float64: two-step softmax, then log (footnote ††)."""
    f = features.double()
    p = prototypes.double()
    total = 0.0
    for i in range(len(f)):
        fh = f[i] / f[i].norm()
        d = torch.stack([abs(float(ds)) * (fh - p[j] / p[j].norm()).norm() for j in range(len(p))])
        prob = torch.exp(-es * d) / torch.exp(-es * d).sum()
        total += -math.log(float(prob[targets[i]]))
    return total / len(f)


def test_loss_matches_float64_paper_formula():
    torch.manual_seed(0)
    head = IsoMaxPlusHead(16, 5)
    with torch.no_grad():
        head.distance_scale.fill_(1.7)
    f = torch.randn(12, 16)
    y = torch.randint(0, 5, (12,))
    got = IsoMaxPlusLoss()(head(f), y)
    want = paper_loss_float64(f, head.prototypes.detach(), 1.7, y)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_fused_and_two_step_forms_agree_on_ordinary_inputs():
    torch.manual_seed(1)
    logits = -torch.rand(64, 10) * 2  # distances in [0, 2], |d_s| = 1
    y = torch.randint(0, 10, (64,))
    two_step = -torch.log(torch.softmax(ENTROPIC_SCALE * logits, dim=1)[torch.arange(64), y]).mean()
    assert IsoMaxPlusLoss()(logits, y).item() == pytest.approx(two_step.item(), rel=1e-6)


def test_fused_form_stays_finite_where_two_step_underflows():
    logits = torch.tensor([[-0.0, -20.0]])  # |d_s| = 10 and a badly wrong sample
    y = torch.tensor([1])
    two_step = -torch.log(torch.softmax(ENTROPIC_SCALE * logits, dim=1)[0, 1])
    assert math.isinf(two_step.item())
    assert IsoMaxPlusLoss()(logits, y).item() == pytest.approx(200.0, rel=1e-6)


def test_unit_distances_match_cdist_float64():
    torch.manual_seed(2)
    f, p = torch.randn(20, 8), torch.randn(6, 8)
    want = torch.cdist(
        F.normalize(f.double(), dim=1),
        F.normalize(p.double(), dim=1),
        compute_mode="donot_use_mm_for_euclid_dist",
    )
    assert torch.allclose(unit_distances(f, p).double(), want, atol=1e-5)
    assert unit_distances(f, p).min() >= 0 and unit_distances(f, p).max() <= 2 + 1e-6


@pytest.mark.parametrize("kind", ["isomaxplus", "isomax", "softmax"])
def test_gradients_reach_every_parameter_and_are_finite(kind):
    torch.manual_seed(3)
    backbone = torch.nn.Linear(10, 8)
    head = make_head(kind, 8, 4)
    if kind == "isomax":  # zero-initialized prototypes would give no gradient to all-equal logits
        with torch.no_grad():
            head.prototypes.normal_()
    loss = IsoMaxPlusLoss()(head(backbone(torch.randn(16, 10))), torch.randint(0, 4, (16,)))
    loss.backward()
    for name, p in [*backbone.named_parameters(), *head.named_parameters()]:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("head_cls", [IsoMaxPlusHead, IsoMaxHead])
def test_gradient_finite_when_feature_coincides_with_prototype(head_cls):
    torch.manual_seed(4)
    head = head_cls(8, 3)
    with torch.no_grad():
        head.prototypes.copy_(torch.randn(3, 8))
    f = head.prototypes.detach()[1:2].clone().requires_grad_(True)  # distance exactly 0 to class 1
    logits = head(f)
    assert logits[0, 1].item() == 0.0
    IsoMaxPlusLoss()(logits, torch.tensor([1])).backward()
    assert torch.isfinite(f.grad).all()
    for p in head.parameters():
        assert torch.isfinite(p.grad).all()


def test_isomaxplus_logits_are_scaled_negative_distances():
    head = IsoMaxPlusHead(4, 3)
    with torch.no_grad():
        head.distance_scale.fill_(-2.5)  # the scale enters as |d_s|
    f = torch.randn(5, 4)
    logits, d = head.logits_and_distances(f)
    assert torch.allclose(logits, -2.5 * d)
    assert torch.equal(logits.argmax(1), d.argmin(1))


def test_initialization_paper_and_unit():
    torch.manual_seed(0)
    paper = IsoMaxPlusHead(256, 10, prototype_init="paper")
    torch.manual_seed(0)
    unit = IsoMaxPlusHead(256, 10)  # the default
    assert paper.distance_scale.item() == 1.0 and unit.distance_scale.item() == 1.0
    p = paper.prototypes.detach()
    assert abs(p.mean().item()) < 0.05 and abs(p.std().item() - 1) < 0.05  # N(0, 1) as in the paper
    u = unit.prototypes.detach()
    assert torch.allclose(u.norm(dim=1), torch.ones(10))
    assert torch.allclose(u, F.normalize(p, dim=1))  # same directions: same model at init
    x = torch.randn(5, 256)
    assert torch.allclose(paper(x), unit(x), atol=1e-6)
    assert torch.count_nonzero(IsoMaxHead(256, 10).prototypes) == 0
    with pytest.raises(ValueError, match="prototype_init"):
        IsoMaxPlusHead(4, 2, prototype_init="xavier")


def test_unknown_head_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown head"):
        make_head("arcface", 8, 2)
    with pytest.raises(ValueError, match="wrong size"):
        IsoMaxPlusLoss()(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_logitnorm_loss_against_a_hand_computed_example():
    """logits (3, 4) have norm 5; divided by 5 * 0.04 they are (15, 20), so the loss is
    log(1 + e^-5) for class 1 and log(1 + e^5) for class 0, whatever the logits' scale."""
    from training.loss import LogitNormLoss, make_loss

    loss = make_loss("logitnorm")
    assert isinstance(loss, LogitNormLoss)
    z = torch.tensor([[3.0, 4.0]])
    assert loss(z, torch.tensor([1])).item() == pytest.approx(math.log1p(math.exp(-5)), rel=1e-5)
    assert loss(z, torch.tensor([0])).item() == pytest.approx(math.log1p(math.exp(5)), rel=1e-5)
    # scaling the logits changes nothing: the norm is divided out
    assert loss(100 * z, torch.tensor([1])).item() == pytest.approx(
        loss(z, torch.tensor([1])).item()
    )
    assert isinstance(make_head("logitnorm", 8, 3), torch.nn.Linear)
