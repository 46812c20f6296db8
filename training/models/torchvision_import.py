"""Import torchvision, also where its C++ ops cannot load (CUDA wheel beside a CPU torch).

PyPI's torchvision wheels are CUDA builds. Installed beside the CPU torch wheel (what the
development machines and CI use; the CPU torchvision wheel lives on an index they cannot
reach), the `torchvision._C` extension fails to load for want of the CUDA libraries. torchvision
copes with that for every op but two: `_meta_registrations` registers fake kernels for
`torchvision::nms` and `torchvision::qnms` without checking that the ops exist, so
`import torchvision` raises "operator torchvision::nms does not exist".

The classification models never call those ops. When (and only when) that exact failure
happens, this module defines the two op schemas, without kernels, and imports torchvision again;
calling `torchvision.ops.nms` then fails with torch's "no kernel" error instead of the import.
Where torchvision's ops load (a matching CPU or CUDA pair), nothing is changed.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_fragment: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops


def import_torchvision() -> ModuleType:
    """`torchvision`, imported; see the module docstring for the one failure it repairs."""
    global _fragment
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e) or _fragment is not None:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _fragment = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            _fragment.define(schema)
        import torchvision
    return torchvision
