"""What a temperature would do for an existing bundle: fit it, report ECE; changes nothing.

    python scripts/bundle_temperature.py models/fmnist-isomaxplus/3 [--plot reliability.png]

Rebuilds the bundle's validation and test splits from the training configuration in its
manifest (`training`: data set, validation size, split seed), runs the bundle's ONNX graph on
them, fits the temperature on the validation split (as `isomax export` does) and prints the
test split's expected calibration error (15 bins) before and after, as JSON. The bundle is not
modified: a bundle with a temperature comes from `isomax export` on its training run. Needs
the [train] extra and the data set where `isomax train` finds it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isomax.contract.manifest import Manifest
from training.config import TrainConfig
from training.data.datasets import load_dataset
from training.export import OnnxPredictor
from training.temperature import (
    ECE_BINS,
    expected_calibration_error,
    fit_temperature,
    plot_reliability,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--plot", type=Path, help="write the reliability diagram here")
    a = p.parse_args()
    manifest = Manifest.read(a.bundle)
    fields = set(TrainConfig.__dataclass_fields__)
    cfg = TrainConfig(**{k: v for k, v in manifest.training.items() if k in fields})
    splits = load_dataset(cfg)
    predict = OnnxPredictor(a.bundle / manifest.onnx.file)
    val_logits, test_logits = predict(splits.val_x)[0], predict(splits.test_x)[0]
    t = fit_temperature(val_logits, splits.val_y)
    report = {
        "bundle": f"{manifest.name}:{manifest.version}",
        "validation_images": len(splits.val_y),
        "test_images": len(splits.test_y),
        "temperature": round(t, 5),
        "ece_bins": ECE_BINS,
        "test_ece_before": round(expected_calibration_error(test_logits, splits.test_y), 4),
        "test_ece_after": round(expected_calibration_error(test_logits, splits.test_y, t), 4),
        "test_accuracy": round(float((test_logits.argmax(1) == splits.test_y).mean()), 4),
    }
    print(json.dumps(report))
    if a.plot:
        plot_reliability(test_logits, splits.test_y, t, a.plot, f"{report['bundle']} (test split)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
