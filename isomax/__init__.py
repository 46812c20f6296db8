"""IsoMax+ as a drop-in: replace your last `nn.Linear` and your loss, then export a bundle.

    from isomax import BundleSpec, CalibrationSet, GraphSpec, IsoMaxPlusHead, IsoMaxPlusLoss
    from isomax import export_bundle

    model.fc = IsoMaxPlusHead(model.fc.in_features, num_classes)   # was nn.Linear
    criterion = IsoMaxPlusLoss()                                   # was nn.CrossEntropyLoss
    ... train as before ...
    export_bundle(model, BundleSpec("my-model", classes, Preprocess(...)),
                  CalibrationSet(held_out_images), GraphSpec(mean=MEAN, std=STD))

Names resolve lazily, so `import isomax` (and `isomax serve`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IsoMaxPlusHead": "training.head",
    "IsoMaxHead": "training.head",
    "IsoMaxPlusLoss": "training.loss",
    "export_bundle": "training.export",
    "BundleSpec": "training.export",
    "CalibrationSet": "training.export",
    "GraphSpec": "training.export",
    "Preprocess": "isomax.contract.manifest",
    "Manifest": "isomax.contract.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'isomax' has no attribute {name!r}")
