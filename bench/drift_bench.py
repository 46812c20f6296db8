"""Drift alerts on simulated streams of the default bundle's real scores: false alarms, delays.

    nice -n 10 .venv/bin/python bench/drift_bench.py            # ~17 min on 2 loaded cores
    nice -n 10 .venv/bin/python bench/drift_bench.py --days 30 --rate 2

The scores are computed once with onnxruntime (cached under bench/out/): Fashion-MNIST test
images (the in-distribution stream), MNIST digits, the test images blurred slightly, and the
validation split (the reference sample of the offline detector; the alerts never see it, they
use the manifest's calibration only). A stream is one image drawn with replacement from a pool
per 1/rate seconds, binned per minute; the alerts are the rules of scripts/drift_rules.py
evaluated once a minute in numpy with the same formulas (the promtool tests check the rules
compute them), the `for:` clauses counted in minutes. The reference detector is a two-sample
Kolmogorov-Smirnov test (scipy.stats.ks_2samp) of the last hour's scores against the
validation scores, evaluated every 5 minutes at p < 1e-4: the test alibi-detect's KSDrift
runs for a univariate score, without alibi-detect's TensorFlow/PyTorch dependencies (its CPU
torch would have to stay pinned, tensorflow is hundreds of MB); Evidently's PSI needs pandas,
plotly and more for one formula. Results: bench/results/drift.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import drift_rules  # noqa: E402

from isomax.contract.drift import DriftTable  # noqa: E402
from isomax.contract.manifest import Manifest  # noqa: E402
from isomax.contract.verdict import Thresholds  # noqa: E402

log = logging.getLogger("drift_bench")
BUNDLE = REPO / "models" / "fmnist-isomaxplus" / "2"
CACHE = REPO / "bench" / "out" / "drift-scores.npz"
RESULTS = REPO / "bench" / "results"
WINDOWS_MIN = {"5m": 5, "1h": 60, "1d": 1440}
BLUR = (0.4, 0.5, 0.6, 0.8)


def scores(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(BUNDLE / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, d = [], []
    for i in range(0, len(x), 500):
        lo, di = session.run(
            ["logits", "min_distance"], {"image": x[i : i + 500] / np.float32(255)}
        )
        logits.append(lo.argmax(1))
        d.append(di)
    return np.concatenate(logits), np.concatenate(d)


def load_pools() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (predicted class, min_distance), computed once."""
    if CACHE.exists():
        z = np.load(CACHE)
        return {k[:-2]: (z[k[:-2] + ".c"], z[k[:-2] + ".d"]) for k in z.files if k.endswith(".c")}
    from scipy.ndimage import gaussian_filter

    from training.data import fmnist, ood
    from training.data.datasets import validation_split

    test, _ = fmnist.load_split("test")
    train, _ = fmnist.load_split("train")
    _, val_idx = validation_split(len(train), 5000, 0)  # the bundle's calibration split
    pools = {
        "test": scores(test),
        "val": scores(train[val_idx]),
        "mnist": scores(ood.load_mnist5k()),
    }
    for s in BLUR:
        b = gaussian_filter(test.astype(np.float32), sigma=(0, 0, s, s))
        pools[f"blur{s:g}"] = scores(np.clip(b, 0, 255).astype(np.uint8))
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        CACHE,
        **{f"{k}.c": v[0] for k, v in pools.items()},
        **{f"{k}.d": v[1] for k, v in pools.items()},
    )
    return pools


@dataclass
class Model:
    table: DriftTable
    thresholds: Thresholds
    class_flagged: np.ndarray  # per class, measured on validation (what a re-export records)
    m: int


def features(model: Model, pool: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, ...]:
    c, d = pool
    bucket = np.array([model.table.bucket(float(v), int(k)) for v, k in zip(d, c, strict=True)])
    _, flags = model.thresholds.judge(c.tolist(), d.tolist())
    return c, bucket, np.array(flags), d


def stream(parts: list[tuple[int, list[tuple[float, tuple[np.ndarray, ...]]]]], rate: float,
           rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    """Per-minute counts: levels [T, 8], classes [T, 10], ood per class [T, 10], and the
    scores per minute (for the offline detector). parts: (minutes, [(share, pool features)])."""
    lv, cl, oo, sc = [], [], [], []
    for minutes, mix in parts:
        n = rng.poisson(rate * 60, minutes)
        minute = np.repeat(np.arange(minutes), n)  # of each image, in order
        pick = rng.choice(len(mix), len(minute), p=[s for s, _ in mix])
        c, b = np.empty(len(minute), np.int64), np.empty(len(minute), np.int64)
        fl, d = np.empty(len(minute), bool), np.empty(len(minute), np.float32)
        for j, (_, f) in enumerate(mix):
            where = pick == j
            idx = rng.integers(0, len(f[0]), int(where.sum()))
            c[where], b[where], fl[where], d[where] = f[0][idx], f[1][idx], f[2][idx], f[3][idx]
        lv.append(np.bincount(minute * 8 + b, minlength=minutes * 8).reshape(minutes, 8))
        cl.append(np.bincount(minute * 10 + c, minlength=minutes * 10).reshape(minutes, 10))
        oo.append(np.bincount((minute * 10 + c)[fl], minlength=minutes * 10).reshape(minutes, 10))
        sc += np.split(d, np.cumsum(n)[:-1])
    return {"levels": np.concatenate(lv), "classes": np.concatenate(cl),
            "ood": np.concatenate(oo), "scores": sc}  # fmt: skip


def window(x: np.ndarray, w: int) -> np.ndarray:
    c = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0)])
    t = np.arange(1, len(x) + 1)
    return c[t] - c[np.maximum(t - w, 0)]


def arcsine_z(
    x: np.ndarray, n: np.ndarray, p: np.ndarray | float, m: np.ndarray | float
) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(n > 0, x / np.maximum(n, 1), 0)
        return 2 * (np.arcsin(np.sqrt(r)) - np.arcsin(np.sqrt(p))) / np.sqrt(1 / n + 1 / m)


def chi_z(counts: np.ndarray, e: np.ndarray, m: int) -> np.ndarray:
    n = counts.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = counts / n[:, None]
        x2 = n * m / (n + m) * ((o - e) ** 2 / e).sum(1)
    k = len(e) - 1
    return ((x2 / k) ** (1 / 3) - (1 - 2 / (9 * k))) / np.sqrt(2 / (9 * k))


def held(cond: np.ndarray, minutes: int) -> np.ndarray:
    """`for: minutes`: true for that many consecutive evaluations."""
    out = cond.copy()
    for k in range(1, minutes + 1):
        out[k:] &= cond[:-k]
        out[:k] = False
    return out


def alerts(s: dict[str, np.ndarray], model: Model) -> dict[str, np.ndarray]:
    """Per minute, whether each alert fires (any tier), as the rules say; plus today's 3x."""
    e = np.array(model.table.expected)
    share = np.array(model.table.class_shares)
    p = 1 - model.thresholds.target_tpr
    z = {w: drift_rules.z_threshold(w) for w in WINDOWS_MIN}
    win = {
        w: {k: window(s[k], mm) for k in ("levels", "classes", "ood")}
        for w, mm in WINDOWS_MIN.items()
    }
    n = {w: v["classes"].sum(1) for w, v in win.items()}
    ood_z = {w: arcsine_z(v["ood"].sum(1), n[w], p, model.m) for w, v in win.items()}
    ok = {w: n[w] * p >= 5 for w in WINDOWS_MIN}
    out = {
        "IsomaxOODRateHigh": held((ood_z["5m"] > z["5m"]) & ok["5m"], 2),
        "IsomaxOODRateDrift": ((ood_z["1h"] > z["1h"]) & ok["1h"] & (ood_z["5m"] > 0))
        | ((ood_z["1d"] > z["1d"]) & ok["1d"] & (ood_z["1h"] > 0)),
    }
    score, mix, cls = (np.zeros(len(s["levels"]), bool) for _ in range(3))
    for w in WINDOWS_MIN:
        score |= (chi_z(win[w]["levels"], e, model.m) > z[w]) & (n[w] * e.min() >= 5)
        mix |= (chi_z(win[w]["classes"], share, model.m) > z[w]) & (n[w] * share.min() >= 5)
        nc = win[w]["classes"]
        cz = arcsine_z(win[w]["ood"], nc, model.class_flagged, share * model.m)
        cls |= ((cz > z[w]) & (nc * model.class_flagged >= 5)).any(1)
    out |= {"IsomaxScoreDrift": score, "IsomaxClassMixDrift": mix, "IsomaxClassOODRate": cls}
    ratio5 = win["5m"]["ood"].sum(1) / np.maximum(n["5m"], 1)
    out["3x (before)"] = held((ratio5 > 3 * p) & (n["5m"] >= 100), 10)
    return out


def ks_alerts(s: dict[str, Any], reference: np.ndarray, every: int = 5) -> np.ndarray:
    """The offline reference: KS of the last hour's scores vs validation, p < 1e-4."""
    from scipy.stats import ks_2samp

    fired = np.zeros(len(s["scores"]), bool)
    for t in range(60, len(s["scores"]), every):
        recent = np.concatenate(s["scores"][t - 59 : t + 1])
        fired[t : t + every] = ks_2samp(recent, reference).pvalue < 1e-4
    return fired


def episodes(fired: np.ndarray) -> int:
    """Rising edges: separate alert episodes."""
    return int(fired[0]) + int((fired[1:] & ~fired[:-1]).sum())


def subset(f: tuple[np.ndarray, ...], mask: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(a[mask] for a in f)


def shifts(
    f: dict[str, tuple[np.ndarray, ...]],
) -> dict[str, list[tuple[float, tuple[np.ndarray, ...]]]]:
    test = f["test"]
    sandal = subset(test, test[0] == 5)
    not_shirt = subset(test, test[0] != 6)
    blurred_shirt = subset(f["blur0.8"], f["blur0.8"][0] == 6)
    out: dict[str, list[tuple[float, tuple[np.ndarray, ...]]]] = {}
    for s in (0.02, 0.05, 0.1, 0.2):
        out[f"MNIST {s:.0%}"] = [(1 - s, test), (s, f["mnist"])]
    for s in BLUR:
        out[f"blur sigma {s:g}"] = [(1.0, f[f"blur{s:g}"])]
    for s in (0.2, 0.4, 1.0):
        out[f"sandals {s:.0%} of traffic"] = (
            [(1 - s, test), (s, sandal)] if s < 1 else [(1.0, sandal)]
        )
    out["shirts blurred (sigma 0.8)"] = [(0.9, not_shirt), (0.1, blurred_shirt)]
    return out


def run(days: float, rate: float, seed: int) -> dict[str, Any]:
    manifest = Manifest.read(BUNDLE)
    cal = manifest.calibration
    thresholds = Thresholds.lookup(cal)
    table = DriftTable.from_calibration(cal, len(manifest.labels), True, thresholds.target_tpr)
    pools = load_pools()
    vc, vd = pools["val"]
    _, vflags = thresholds.judge(vc.tolist(), vd.tolist())
    vflags = np.array(vflags)
    flagged = np.array([vflags[vc == c].mean() for c in range(len(manifest.labels))])
    model = Model(table, thresholds, flagged, cal.size)
    f = {k: features(model, v) for k, v in pools.items()}
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"rate_images_per_s": rate, "id_days": days, "seed": seed,
                           "test_flagged": float(f["test"][2].mean()),
                           "class_flagged_validation": flagged.round(4).tolist()}  # fmt: skip
    minutes = int(days * 1440)
    s = stream([(minutes, [(1.0, f["test"])])], rate, rng)
    fired = alerts(s, model)
    fired["KS 1h (offline)"] = ks_alerts(s, vd)
    out["false_alarms_per_30_days"] = {k: episodes(v) * 30 / days for k, v in fired.items()}
    out["shifts"] = {}
    for name, mix in shifts(f).items():
        t0 = 1440
        s = stream([(t0, [(1.0, f["test"])]), (1440, mix)], rate, rng)
        fired = alerts(s, model)
        fired["KS 1h (offline)"] = ks_alerts(s, vd)
        flagged_share = float(s["ood"][t0:].sum() / s["classes"][t0:].sum())
        delays = {}
        for k, v in fired.items():
            hit = np.flatnonzero(v[t0:])
            delays[k] = None if not len(hit) else int(hit[0]) + 1
        out["shifts"][name] = {"flagged_share": round(flagged_share, 4), "delay_minutes": delays}
        log.info("%s: flagged %.3f, delays %s", name, flagged_share, delays)
    return out


def markdown(r: dict[str, Any]) -> str:
    rate = r["rate_images_per_s"]
    names = list(r["false_alarms_per_30_days"])
    lines = [
        f"Drift alerts on the default bundle's real scores, {rate:g} images/s, one sitting "
        f"({r['machine']}, {r['date'][:10]}). In-distribution stream: {r['id_days']:g} days of "
        f"Fashion-MNIST test images (flagged share {r['test_flagged']:.4f}).",
        "",
        "False alarms per 30 days of in-distribution traffic:",
        "",
        "| " + " | ".join(names) + " |",
        "|" + " ---: |" * len(names),
        "| " + " | ".join(f"{v:g}" for v in r["false_alarms_per_30_days"].values()) + " |",
        "",
        f"Detection delay after the shift starts (1 day of in-distribution traffic before it), "
        f"minutes (images at {rate:g}/s = 60 x {rate:g} per minute); - = not within a day:",
        "",
        "| shift | flagged | " + " | ".join(names) + " |",
        "| --- | ---: |" + " ---: |" * len(names),
    ]
    for shift, v in r["shifts"].items():
        cells = [
            ("-" if d is None else f"{d} ({int(d * 60 * rate)})")
            for d in v["delay_minutes"].values()
        ]
        lines.append(f"| {shift} | {v['flagged_share']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=float, default=30.0, help="in-distribution stream length")
    ap.add_argument("--rate", type=float, default=2.0, help="images per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="drift")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
         "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
         **run(args.days, args.rate, args.seed)}  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(r, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
