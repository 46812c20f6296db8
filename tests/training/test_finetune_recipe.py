"""The fine-tuning recipe is the default for a pretrained backbone, equals what docs/training.md
documents, and every flag still overrides it; the linear probe and frozen BatchNorm do what the
recipe relies on."""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

from training.cli import _config, build_parser
from training.config import FINETUNE_RECIPE, TrainConfig
from training.finetune import fit_head, set_batchnorm_eval
from training.head import IsoMaxPlusHead
from training.loss import make_loss

ROOT = Path(__file__).resolve().parents[2]
SHORT = "train --dataset folder --data-dir photos --arch efficientnet-lite0 --weights imagenet"


def _parsed(command: str) -> TrainConfig:
    return _config(build_parser().parse_args(shlex.split(command)))


def _documented_recipe() -> dict[str, str]:
    """`| --flag | value |` rows of the recipe table in docs/training.md."""
    text = (ROOT / "docs" / "training.md").read_text()
    table = text.split("<!-- recipe table -->")[1]
    return dict(re.findall(r"^\| `--([a-z-]+)` \| `([^`]+)` \|", table, flags=re.MULTILINE))


def test_the_short_command_gets_the_documented_recipe() -> None:
    cfg = _parsed(SHORT)
    assert cfg.recipe == "finetune"
    for name, value in FINETUNE_RECIPE.items():
        assert getattr(cfg, name) == value, name
    documented = _documented_recipe()
    assert set(documented) == {n.replace("_", "-") for n in FINETUNE_RECIPE}
    for name, value in FINETUNE_RECIPE.items():
        shown = documented[name.replace("_", "-")]
        expected = ("on" if value else "off") if isinstance(value, bool) else str(value)
        assert shown == expected, (name, shown, value)
    # The same defaults from Python, without the command line.
    assert TrainConfig.with_recipe(
        dataset="folder", data_dir="photos", arch="efficientnet-lite0", weights="imagenet"
    ) == dataclasses.replace(cfg)


def test_every_flag_overrides_the_recipe() -> None:
    cfg = _parsed(f"{SHORT} --lr 0.2 --no-linear-probe --augment --schedule step --batch-size 8")
    assert (cfg.lr, cfg.linear_probe, cfg.augment, cfg.schedule, cfg.batch_size) == (
        0.2,
        False,
        True,
        "step",
        8,
    )
    assert cfg.freeze_batchnorm is FINETUNE_RECIPE["freeze_batchnorm"]  # untouched: recipe's
    # --recipe paper: the paper's defaults although weights are given.
    assert _parsed(f"{SHORT} --recipe paper") == TrainConfig(
        dataset="folder",
        data_dir="photos",
        arch="efficientnet-lite0",
        weights="imagenet",
        recipe="paper",
    )


def test_without_pretrained_weights_the_defaults_stay_the_papers() -> None:
    for command in ("train", "train --arch efficientnet-lite0", "train --arch resnet18"):
        cfg = _parsed(command)
        assert cfg.recipe == "paper"
        assert dataclasses.replace(cfg, recipe="auto", arch="smallcnn") == TrainConfig()


def test_an_unknown_recipe_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown recipe 'gentle'"):
        TrainConfig.with_recipe(recipe="gentle")


def test_linear_probe_fits_the_head_on_fixed_features() -> None:
    """Three well-separated clusters: the fitted head classifies them all and its loss is far
    below the random head's."""
    torch.manual_seed(0)
    centers = torch.randn(3, 16) * 3
    labels = torch.arange(3).repeat_interleave(40)
    feats = centers[labels] + 0.3 * torch.randn(120, 16)
    head = IsoMaxPlusHead(16, 3)
    loss_fn = make_loss("isomaxplus")
    before = float(loss_fn(head(feats), labels).detach())
    after = fit_head(head, "isomaxplus", feats, labels)
    assert after < before / 10
    assert bool((head(feats).argmax(1) == labels).all())
    assert torch.isfinite(head.distance_scale).all()


def test_frozen_batchnorm_keeps_running_statistics_while_its_weights_train() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.rand(2, 3, 8, 8))
    model.train()
    set_batchnorm_eval(model)
    bn = model[1]
    stats = bn.running_mean.clone(), bn.running_var.clone()
    weight = bn.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(torch.rand(8, 3, 8, 8) * 5 + 2).square().mean()
    loss.backward()
    opt.step()
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert not torch.equal(bn.weight.detach(), weight)
    assert model[0].training  # the rest stays in train mode
