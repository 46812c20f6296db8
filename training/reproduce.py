"""The paper's comparison (Tables 2, 3, 6 and Fig. 1) with this project's code, over seeds.

Every (head, seed) run lives in its own run directory and is reused when finished, resumed
when interrupted, and trained otherwise; every evaluation is cached beside its run as
`eval/outputs.npz` + `eval/metrics.json`. Running the command again continues the study.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.config import TrainConfig
from training.evaluate import Outputs, evaluate, report_score_fn
from training.scores import entropic, scores_for

log = logging.getLogger(__name__)

HEADS = ("softmax", "isomax", "isomaxplus")
# Methods = heads, plus IsoMax+ with the paper's prototype initialization (training/head.py).
METHODS = (*HEADS, "isomaxplus-paperinit")
NAMES = {
    "softmax": "SoftMax",
    "isomax": "IsoMax",
    "isomaxplus": "IsoMax+",
    "isomaxplus-paperinit": "IsoMax+ (paper init)",
}


def method_config(
    base: TrainConfig, method: str, seed: int, classes: list[int] | None
) -> TrainConfig:
    head, init = (
        ("isomaxplus", "paper")
        if method == "isomaxplus-paperinit"
        else (method, base.prototype_init)
    )
    return dataclasses.replace(base, head=head, prototype_init=init, seed=seed, classes=classes)


def _scores(method: str) -> list[str]:
    return scores_for(method.removesuffix("-paperinit"))


OPEN_SET_SET = "held-out-classes"


def run_name(cfg: TrainConfig) -> str:
    init = "-paperinit" if cfg.head == "isomaxplus" and cfg.prototype_init == "paper" else ""
    base = f"{cfg.dataset}-{cfg.arch}-{cfg.head}{init}-s{cfg.seed}"
    return base + (f"-open{''.join(map(str, cfg.classes))}" if cfg.classes else "")


def _finished(run_dir: Path, cfg: TrainConfig) -> bool:
    from training.train import last_record

    record = last_record(run_dir)
    return (run_dir / "best.pt").is_file() and record is not None and record["epoch"] >= cfg.epochs


def ensure_trained(cfg: TrainConfig, run_dir: Path, progress: bool) -> float:
    """Train or resume `run_dir` to completion; returns its training seconds."""
    from training.train import last_record, train

    if not _finished(run_dir, cfg):
        log.info("training %s", run_dir.name)
        train(cfg, run_dir, resume=True, progress=progress)
    record = last_record(run_dir)
    assert record is not None  # training wrote it
    return float(record["seconds"])


def ensure_evaluated(
    cfg: TrainConfig, run_dir: Path, ood_sets: dict[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, Outputs]]:
    """Cached evaluation of `best.pt`: report + raw outputs for every set ('in' = test split)."""
    import torch

    from training.data.datasets import load_dataset
    from training.train import load_checkpoint, predict

    eval_dir = run_dir / "eval"
    mpath, opath = eval_dir / "metrics.json", eval_dir / "outputs.npz"
    if mpath.is_file() and opath.is_file():
        report = json.loads(mpath.read_text())
        same_sets = set(report["ood"]) == set(ood_sets) | ({OPEN_SET_SET} if cfg.classes else set())
        if same_sets and report.get("scores") == scores_for(cfg.head):  # else: re-score
            with np.load(opath) as z:
                arrays = {k: z[k] for k in z.files}
            names = [k.removesuffix(".logits") for k in arrays if k.endswith(".logits")]
            outputs = {n: (arrays[f"{n}.logits"], arrays.get(f"{n}.dist")) for n in names}
            return report, outputs
    model, cfg_ck, _ = load_checkpoint(run_dir / "best.pt")
    data = load_dataset(cfg_ck)
    sets = dict(ood_sets)
    if data.held_out_x is not None:
        sets[OPEN_SET_SET] = data.held_out_x
    assert data.test_x is not None and data.test_y is not None
    device = torch.device("cpu")
    report, outputs = evaluate(
        lambda x: predict(model, x, device),
        cfg.head,
        data.test_x,
        data.test_y,
        sets,
        val=(data.val_x, data.val_y),
    )
    eval_dir.mkdir(parents=True, exist_ok=True)
    mpath.write_text(json.dumps(report, indent=2) + "\n")
    arrays = {f"{k}.logits": v[0] for k, v in outputs.items()}
    arrays |= {f"{k}.dist": v[1] for k, v in outputs.items() if v[1] is not None}
    np.savez_compressed(opath, **arrays)
    return report, outputs


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std; the std is None for a single seed (there is no spread to report)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """`summary[<head>_<score>]` with seeds, accuracy and per-set AUROC / TNR@TPR95 mean +- std."""
    summary: dict[str, Any] = {}
    for head in METHODS:
        hr = [r for r in runs if r["head"] == head]
        if not hr:
            continue
        # Scores every run of this method has (runs scored before a score existed lack it).
        scored = [sc for sc in _scores(head) if all(sc in v for r in hr for v in r["ood"].values())]
        for score in scored:
            per_set: dict[str, Any] = {}
            for s in hr[0]["ood"]:
                au = [r["ood"][s][score]["auroc"] for r in hr]
                tn = [r["ood"][s][score]["tnr_at_tpr95"] for r in hr]
                (am, asd), (tm, tsd) = _mean_std(au), _mean_std(tn)
                per_set[s] = {
                    "auroc_mean": am,
                    "auroc_std": asd,
                    "tnr_at_tpr95_mean": tm,
                    "tnr_at_tpr95_std": tsd,
                }
            acc_m, acc_s = _mean_std([r["accuracy"]["test"] for r in hr])
            per_seed_mean_auroc = [
                np.mean([r["ood"][s][score]["auroc"] for s in r["ood"]]) for r in hr
            ]
            am, asd = _mean_std(per_seed_mean_auroc)
            summary[f"{head}_{score}"] = {
                "seeds": [r["seed"] for r in hr],
                "accuracy_mean": acc_m,
                "accuracy_std": acc_s,
                "auroc_mean": am,
                "auroc_std": asd,
                "tnr_at_tpr95_mean": float(
                    np.mean([v["tnr_at_tpr95_mean"] for v in per_set.values()])
                ),
                "per_set": per_set,
            }
    return summary


def _pm(m: float, s: float | None) -> str:
    return f"{100 * m:.1f}" if s is None else f"{100 * m:.1f}±{100 * s:.1f}"


def _table(summary: dict[str, Any], methods: Sequence[str], sets: Iterable[str]) -> list[str]:
    present = [m for m in methods if m in summary]
    if not present:  # e.g. a study of other heads only
        return ["(no run of these methods in this study)"]
    lines = [
        "| OOD set | "
        + " | ".join(f"{_label(m)} TNR@TPR95" for m in present)
        + " | "
        + " | ".join(f"{_label(m)} AUROC" for m in present)
        + " |"
    ]
    lines.append("|" + " --- |" * (1 + 2 * len(present)))
    for s in sets:
        # A method without runs on this set (e.g. no open-set runs of it) shows a dash.
        aurocs = [
            summary[m]["per_set"][s]["auroc_mean"] for m in present if s in summary[m]["per_set"]
        ]
        best = max(aurocs, default=None)
        cells = [_cell(summary[m]["per_set"].get(s), "tnr_at_tpr95", best) for m in present]
        cells += [_cell(summary[m]["per_set"].get(s), "auroc", best) for m in present]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def _cell(v: dict[str, Any] | None, metric: str, best_auroc: float | None) -> str:
    if v is None:
        return "–"
    text = _pm(v[f"{metric}_mean"], v[f"{metric}_std"])
    return f"**{text}**" if metric == "auroc" and v["auroc_mean"] == best_auroc else text


def _all_sets(summary: dict[str, Any]) -> list[str]:
    """Every OOD set of any method, in the order they first appear."""
    return list(dict.fromkeys(s for v in summary.values() for s in v["per_set"]))


# mds_class: MDS against the predicted class's own validation threshold (training/scores.py).
SCORE_LABELS = {"mds_class": "MDS/class", "es_class": "ES/class"}


def _score_label(score: str) -> str:
    return SCORE_LABELS.get(score, score.upper())


def _label(method: str) -> str:
    head, score = method.split("_", 1)
    return f"{NAMES[head]}<sub>{_score_label(score)}</sub>"


# The paper's claims and this project's changes: (claim, method a, method b), each holding
# where a has the higher mean AUROC on every OOD set both were scored on.
CLAIMS = (
    ("IsoMax+ with MDS beats SoftMax with the entropic score (Table 3)", "isomaxplus_mds", "softmax_es"),
    ("IsoMax+ with MDS beats IsoMax with the entropic score (Table 3)", "isomaxplus_mds", "isomax_es"),
    ("On IsoMax+, MDS beats the entropic score (Table 6)", "isomaxplus_mds", "isomaxplus_es"),
    ("MDS works on IsoMax+ but not on IsoMax (Table 6, Fig. 1)", "isomaxplus_mds", "isomax_mds"),
    ("IsoMax+ with MDS beats SoftMax with the energy score (not in the paper)", "isomaxplus_mds", "softmax_energy"),
    ("Class thresholds beat the global one for MDS on IsoMax+ (this project's change)", "isomaxplus_mds_class", "isomaxplus_mds"),
    ("On IsoMax+ with class thresholds, MDS beats the entropic score (this project's change)", "isomaxplus_mds_class", "isomaxplus_es_class"),
    ("IsoMax+ with MDS/class beats SoftMax with the energy score (not in the paper)", "isomaxplus_mds_class", "softmax_energy"),
    ("Unit-norm prototypes beat the paper's N(0, 1) initialization for MDS (this project's change)", "isomaxplus_mds", "isomaxplus-paperinit_mds"),
)  # fmt: skip


def _claim(summary: dict[str, Any], text: str, a: str, b: str) -> str | None:
    """One line of `claims`, or None when either method was not run."""
    if a not in summary or b not in summary:
        return None
    pa, pb = summary[a]["per_set"], summary[b]["per_set"]
    sets = [s for s in pa if s in pb]  # the sets both were scored on
    w = [s for s in sets if pa[s]["auroc_mean"] > pb[s]["auroc_mean"]]
    verdict = (
        "holds"
        if len(w) == len(sets)
        else ("holds on most sets" if len(w) > len(sets) / 2 else "does not hold")
    )
    lost = sorted(set(sets) - set(w))
    return (
        f"- {text}: **{verdict}** (higher mean AUROC on {len(w)}/{len(sets)} sets"
        + (f"; not on {', '.join(lost)}" if lost else "")
        + ")."
    )


def claims(summary: dict[str, Any]) -> list[str]:
    """The paper's claims, each checked on this data: 'holds' or 'does not hold', with counts."""
    out = [line for c in CLAIMS if (line := _claim(summary, *c)) is not None]
    if "softmax_es" in summary and "isomaxplus_mds" in summary:
        d = summary["isomaxplus_mds"]["accuracy_mean"] - summary["softmax_es"]["accuracy_mean"]
        out.append(
            f"- No accuracy drop, IsoMax+ within 1 point of SoftMax (Table 2): **{'holds' if d > -0.01 else 'does not hold'}** (IsoMax+ − SoftMax = {100 * d:+.2f} points)."
        )
    return out


def _optimizer(cfg: dict[str, Any]) -> str:
    if cfg.get("optimizer", "sgd") == "adamw":
        return "AdamW"
    return f"SGD{' Nesterov' if cfg.get('nesterov', True) else ''} {cfg.get('momentum', 0.9)}"


def write_report(result: dict[str, Any], out_dir: Path, figures: dict[str, str]) -> Path:
    """`out_dir/reproduction.md`: the recipe and cost, the claims, the paper's tables, figures."""
    lines = [
        *_report_intro(result),
        *_report_tables(result["summary"]),
        "## Figures",
        "",
        *[f"![{k}]({v})" for k, v in figures.items()],
        "",
    ]
    path = out_dir / "reproduction.md"
    path.write_text("\n".join(lines))
    return path


def _report_intro(result: dict[str, Any]) -> list[str]:
    """The report's title, recipe, cost and what holds."""
    s = result["summary"]
    cfg = result["recipe"]
    return [
        "# Reproduction: IsoMax+ vs IsoMax vs SoftMax on Fashion-MNIST"
        if cfg["dataset"] == "fashion-mnist"
        else f"# Reproduction on {cfg['dataset']}",
        "",
        f"Generated by `isomax reproduce` ({len(result['runs'])} runs, seeds {result['seeds']}); all numbers are mean ± sample std over seeds, in %.",
        f"Model `{cfg['arch']}`, {cfg['epochs']} epochs, batch {cfg['batch_size']}, {_optimizer(cfg)}, lr {cfg['lr']} (÷10 at {', '.join(str(m) for m in cfg['lr_milestones'])} of training), weight decay {cfg['weight_decay']}, augmentation {'crop+flip' if cfg['augment'] else 'none'}.",
        f"The paper used 300 epochs of batch 64 with DenseNet-BC-100 / ResNet-110 on CIFAR-10/100 and SVHN on a GPU (see docs/paper-recipe.md). Cost here: {result['train_seconds'] / 60:.0f} min of training summed over the runs, plus {(result['wall_seconds'] - result['train_seconds']) / 60:.0f} min for this report's evaluation, on {result['machine']}.",
        f"In-distribution = the {dataset_name(cfg['dataset'])} test split; checkpoints selected on the validation split held out of train (never the test split).",
        "",
        "## What holds and what does not",
        "",
        *claims(s),
        *(["", *result.get("notes", [])] if result.get("notes") else []),
        "",
    ]


def _report_tables(s: dict[str, Any]) -> list[str]:
    """Tables 2, 3 and 6 of the paper, the SoftMax scores, and the means over OOD sets."""
    sets = _all_sets(s)
    return [
        "## Table 2: test accuracy",
        "",
        "| loss | accuracy |",
        "| --- | --- |",
        *[
            f"| {NAMES[h]} | {_pm(s[f'{h}_{_scores(h)[0]}']['accuracy_mean'], s[f'{h}_{_scores(h)[0]}']['accuracy_std'])} |"
            for h in METHODS
            if f"{h}_{_scores(h)[0]}" in s
        ],
        "",
        "## Table 3: the seamless approaches (SoftMax<sub>ES</sub> / IsoMax<sub>ES</sub> / IsoMax+<sub>MDS</sub>)",
        "",
        *_table(s, ["softmax_es", "isomax_es", "isomaxplus_mds", "isomaxplus_mds_class"], sets),
        "",
        "## Table 6: IsoMax variants and scores",
        "",
        *_table(
            s,
            [
                "isomax_es",
                "isomax_mds",
                "isomaxplus_es",
                "isomaxplus_mds",
                "isomaxplus_mds_class",
                "isomaxplus_es_class",
                "isomaxplus-paperinit_es",
                "isomaxplus-paperinit_mds",
            ],
            sets,
        ),
        "",
        "## Scores a SoftMax user would pick instead of retraining",
        "",
        *_table(
            s,
            [
                "softmax_es",
                "softmax_mps",
                "softmax_energy",
                "softmax_max_logit",
                "isomaxplus_mds",
                "isomaxplus_mds_class",
            ],
            sets,
        ),
        "",
        "## Mean over OOD sets",
        "",
        "| method | accuracy | mean AUROC | mean TNR@TPR95 |",
        "| --- | --- | --- | --- |",
        *[
            f"| {_label(m)} | {_pm(v['accuracy_mean'], v['accuracy_std'])} | {_pm(v['auroc_mean'], v['auroc_std'])} | {100 * v['tnr_at_tpr95_mean']:.1f} |"
            for m, v in sorted(s.items(), key=lambda kv: -kv[1]["auroc_mean"])
        ],
        "",
    ]


def make_figures(
    outputs_by_head: dict[str, dict[str, Outputs]],
    out_dir: Path,
    ood_for_fig1: str = "mnist",
    reports_by_head: dict[str, dict[str, Any]] | None = None,
    dataset: str = "fashion-mnist",
) -> dict[str, str]:
    from training.plots import plot_fig1_grid, plot_roc_curves

    figs: dict[str, str] = {}
    if "isomax" in outputs_by_head and "isomaxplus" in outputs_by_head:
        panels = {}
        for head in ("isomax", "isomaxplus"):
            o = outputs_by_head[head]
            d_in, d_out = o["in"][1], o[ood_for_fig1][1]
            assert d_in is not None and d_out is not None  # distance heads always give them
            panels[NAMES[head]] = {
                "entropy": (-entropic(o["in"][0]), -entropic(o[ood_for_fig1][0])),
                "minimum distance": (d_in, d_out),
            }
        p = plot_fig1_grid(
            panels,
            out_dir / "fig1_entropy_distance.png",
            ood_name=ood_for_fig1,
            id_name=f"{dataset_name(dataset)} test",
            title="Fig. 1 analog (seed 0)",
        )
        figs["Fig. 1 analog"] = p.name
    for head, score in (
        ("isomaxplus", "mds"),
        ("isomaxplus", "mds_class"),
        ("isomaxplus", "es"),
        ("isomaxplus", "es_class"),
        ("softmax", "es"),
        ("softmax", "energy"),
        ("isomax", "es"),
    ):
        report = (reports_by_head or {}).get(head, {})
        if head not in outputs_by_head or score not in report.get("scores", [score]):
            continue
        o = outputs_by_head[head]
        fn = report_score_fn(report, score)
        p = plot_roc_curves(
            fn(*o["in"]),
            {k: fn(*v) for k, v in o.items() if k != "in"},
            f"{NAMES[head]} {_score_label(score)} (seed 0)",
            out_dir / f"roc_{head}_{score}.png",
        )
        figs[f"ROC {NAMES[head]} {_score_label(score)}"] = p.name
    return figs


@dataclasses.dataclass
class _Runs:
    """What `reproduce` gathers run by run: the entries, and seed 0's outputs for the figures."""

    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    open_runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    first_outputs: dict[str, dict[str, Outputs]] = dataclasses.field(default_factory=dict)
    first_reports: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    train_seconds: float = 0.0

    def add(
        self,
        head: str,
        seed: int,
        run_dir: Path,
        classes: list[int] | None,
        report: dict[str, Any],
        outputs: dict[str, Outputs],
    ) -> None:
        entry = {
            "head": head,
            "seed": seed,
            "run": run_dir.name,
            "accuracy": report["accuracy"],
            "ood": report["ood"],
        }
        (self.open_runs if classes else self.runs).append(entry)
        if head not in self.first_outputs and not classes:
            self.first_outputs[head], self.first_reports[head] = outputs, report


def _with_open_set(summary: dict[str, Any], open_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """`summary` with the open-set runs' row added to each method's sets."""
    if open_runs:
        for k, v in summarize(open_runs).items():
            if k in summary:
                summary[k]["per_set"][OPEN_SET_SET] = v["per_set"][OPEN_SET_SET]
                summary[k]["open_set_accuracy_mean"] = v["accuracy_mean"]
    return summary


def reproduce(
    base: TrainConfig,
    seeds: Sequence[int],
    runs_dir: Path,
    out_dir: Path,
    heads: Sequence[str] = HEADS,
    open_set: Sequence[int] | None = None,
    progress: bool = True,
    only_finished: bool = False,
) -> dict[str, Any]:
    from training.data.ood import load_ood_sets

    t0 = time.perf_counter()
    ood_sets = load_ood_sets() if base.dataset == "fashion-mnist" else {}
    done = _Runs()
    for seed in seeds:
        for head in heads:
            for classes in [None, list(open_set)] if open_set else [None]:
                cfg = method_config(base, head, seed, classes)
                run_dir = runs_dir / run_name(cfg)
                if only_finished and not _finished(run_dir, cfg):
                    log.warning("skipping %s: not finished (--only-finished)", run_dir.name)
                    continue
                done.train_seconds += ensure_trained(cfg, run_dir, progress)
                report, outputs = ensure_evaluated(cfg, run_dir, {} if classes else ood_sets)
                done.add(head, seed, run_dir, classes, report, outputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, open_runs, train_seconds = done.runs, done.open_runs, done.train_seconds
    summary = _with_open_set(summarize(runs), open_runs)
    result = {
        "recipe": base.to_dict() | {"head": None, "seed": None},
        "seeds": sorted({r["seed"] for r in runs}),
        "open_set_classes": list(open_set) if open_set else None,
        "machine": _machine(base.device),
        "train_seconds": train_seconds,
        "runs": runs + [{**r, "open_set": True} for r in open_runs],
        "summary": summary,
    }
    figures = make_figures(
        done.first_outputs, out_dir, reports_by_head=done.first_reports, dataset=base.dataset
    )
    result["wall_seconds"] = train_seconds + (time.perf_counter() - t0)
    prior = out_dir / "reproduction.json"
    if prior.is_file():  # hand-written findings survive a re-run
        result["notes"] = json.loads(prior.read_text()).get("notes", [])
    (out_dir / "reproduction.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, out_dir, figures)
    return result


def _machine(device: str) -> str:
    """The hardware the runs trained on: the GPU when the config's device resolved to one."""
    import os
    import platform

    import torch

    from training.devices import resolve_device

    cpu = f"{os.cpu_count()} CPU cores ({platform.machine()})"
    if resolve_device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(0)} GPU ({torch.cuda.device_count()} visible), {cpu}"
    return f"{cpu}, no GPU used"


DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "cifar": "CIFAR", "folder": "the image folder"}


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)
