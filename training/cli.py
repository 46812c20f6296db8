"""Training subcommands of `isomax` (data, train, evaluate, export, reproduce)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path

from isomax.contract.verdict import SERVED_SCORES
from training.config import TrainConfig

log = logging.getLogger("isomax")

# Loggers whose INFO lines are ours; other libraries' (onnxscript's ~80 "Replaced initializer"
# lines per export) show only from WARNING, unless --verbose.
OWN_LOGGERS = ("isomax", "training", "service", "__main__")


class _OwnInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN_LOGGERS


def configure_logging(verbose: bool) -> None:
    """Our INFO lines and everyone's warnings; `--verbose`: every logger at DEBUG.

    A filter on the handler rather than logger levels: some libraries set their own loggers'
    levels, which a root level does not override.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_OwnInfo())


def _int_list(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _float_list(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One option per `TrainConfig` field, typed from its annotation, helped by its doc.

    Options not given stay out of the namespace (`SUPPRESS`), so `TrainConfig.with_recipe`
    can tell a default from a choice: the fine-tuning recipe's defaults apply only to fields
    the command line left alone.
    """
    from training.config import FINETUNE_RECIPE

    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "")
        if default is not None:
            help_text += f" (default: {_shown(default)}"
            if f.name in FINETUNE_RECIPE:
                help_text += f"; with pretrained --weights: {_shown(FINETUNE_RECIPE[f.name])}"
            help_text += ")"
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        base = args[0] if args and typing.get_origin(kind) is not list else kind
        if base is bool:
            p.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        parse: typing.Callable[[str], object]
        if typing.get_origin(base) is list:
            parse = _int_list if typing.get_args(base) == (int,) else _float_list
        else:
            parse = base
        p.add_argument(flag, type=parse, default=argparse.SUPPRESS, help=help_text)


def _shown(value: object) -> object:
    return ",".join(map(str, value)) if isinstance(value, list) else value


def _config(a: argparse.Namespace) -> TrainConfig:
    """The config of the options given, the recipe's defaults for the rest."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.with_recipe(**{k: v for k, v in vars(a).items() if k in names})


def cmd_train(a: argparse.Namespace) -> int:
    from training.train import train

    cfg = _config(a)
    from training.reproduce import run_name

    out = Path(a.out) if a.out else Path("runs") / run_name(cfg)
    result = train(cfg, out, resume=a.resume, progress=not a.quiet)
    print(
        json.dumps(
            {
                "run_dir": str(result.run_dir),
                "best_val_accuracy": result.best_val_accuracy,
                "best_epoch": result.best_epoch,
                "train_seconds": round(result.seconds, 1),
            }
        )
    )
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from training.data.ood import ood_sets_for
    from training.evaluate import evaluate, markdown_table, write_report
    from training.export_run import load_run
    from training.train import predict, serving_preprocess

    model, cfg, meta, splits = load_run(Path(a.run_dir), a.checkpoint)
    if splits.test_x is None or splits.test_y is None:
        raise ValueError("this data set has no test split to evaluate on")
    sets = ood_sets_for(splits, a.ood, a.ood_folder, serving_preprocess(meta, cfg))
    report, outputs = evaluate(
        lambda x: predict(model, x, __import__("torch").device("cpu")),
        cfg.head,
        splits.test_x,
        splits.test_y,
        sets,
        val=(splits.val_x, splits.val_y),
    )
    out = Path(a.out) if a.out else Path(a.run_dir) / "eval"
    write_report(report, outputs, out, f"{cfg.arch} {cfg.head} seed {cfg.seed}")
    print(markdown_table(report))
    print(f"report written to {out}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from training.evaluate import markdown_table
    from training.export_run import export_run
    from training.temperature import plot_reliability

    done = export_run(
        Path(a.run_dir),
        a.checkpoint,
        name=a.name,
        version=a.version,
        models_dir=a.models_dir,
        target_tpr=a.target_tpr,
        ood=a.ood,
        ood_folders=a.ood_folder,
        evaluate_sets=not a.no_eval,
        temperature=not a.no_temperature,
        per_class=not a.global_threshold,
        description=a.description,
        score=a.score,
    )
    bundle, report = done.bundle, done.report
    if report:
        print(markdown_table(report))
        print(
            "flagged as OOD at the calibrated threshold:",
            json.dumps(report["flagged_at_threshold"]),
        )
        if "score_selection" in report:
            print(
                "served score picked on validation + pseudo-OOD:",
                json.dumps(report["score_selection"]),
            )
    print(threshold_summary(bundle))
    if (
        done.test_logits is not None
        and done.test_labels is not None
        and done.temperature is not None
    ):
        plot = plot_reliability(
            done.test_logits,
            done.test_labels,
            done.temperature,
            Path(a.run_dir) / "export" / f"{bundle.parent.name}-{bundle.name}-reliability.png",
            f"{bundle.parent.name}:{bundle.name} on the test split",
        )
        print("calibration error (ECE, 15 bins) on test:", json.dumps(report["calibration_error"]))
        print(f"reliability diagram: {plot}")
    print(json.dumps({"bundle": str(bundle)}))
    return 0


def threshold_summary(bundle: Path) -> str:
    """Which classes have a threshold of their own and which fall back to the global one."""
    from isomax.contract.manifest import Manifest

    m = Manifest.read(bundle)
    cal = m.calibration
    if cal.per_class is None:
        return f"thresholds: one global threshold ({cal.threshold:.4f}) for every class"
    pooled = [
        f"{label} ({c.size})" for label, c in zip(m.labels, cal.per_class, strict=True) if c.pooled
    ]
    if not pooled:
        return (
            f"thresholds: every class has its own (>= {cal.min_class_size} validation images each)"
        )
    which = (
        "every class uses"
        if len(pooled) == len(m.labels)
        else f"{len(pooled)} of {len(m.labels)} classes use"
    )
    return (
        f"thresholds: {which} the global threshold {cal.threshold:.4f}, having fewer than "
        f"{cal.min_class_size} validation images predicted as them: {', '.join(pooled)}. More "
        "validation images per class (a val/ folder, or a larger folder) give each its own."
    )


def cmd_select(a: argparse.Namespace) -> int:
    from training.select_runs import markdown, select_runs

    record = select_runs([Path(d) for d in a.run_dirs], Path(a.json) if a.json else None)
    print(markdown(record))
    print(f"chosen: {record['chosen']} serving {record['chosen_score']}")
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    if a.photos:
        from training.data.sample_photos import make_photo_folder

        root = make_photo_folder(Path(a.photos))
        counts = {p.name: sum(1 for _ in p.rglob("*.jpg")) for p in sorted(root.iterdir())}
        print(json.dumps({"photo_folder": str(root), "images": counts}))
        return 0
    from training.data import fmnist
    from training.data.ood import load_ood_sets

    tx, _ = fmnist.load_split("train", Path(a.data_dir) if a.data_dir else None)
    sx, sy = fmnist.load_split("test", Path(a.data_dir) if a.data_dir else None)
    info = {"fashion-mnist": {"train": len(tx), "test": len(sx), "labels": list(fmnist.LABELS)}}
    sets = load_ood_sets()
    info["ood"] = {k: list(v.shape) for k, v in sets.items()}
    if a.samples:
        _write_samples(Path(a.samples), sx, sy, sets["mnist"], a.n)
        info["samples"] = a.samples
    print(json.dumps(info, indent=2))
    return 0


def _write_samples(out: Path, fm_x, fm_y, mnist_x, n: int) -> None:
    """PNG files to try the service with: Fashion-MNIST test images and MNIST digits."""
    from PIL import Image

    from training.data import fmnist

    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = fmnist.LABELS[fm_y[i]].replace("/", "-").replace(" ", "-").lower()
        Image.fromarray(fm_x[i, 0]).save(out / f"fmnist-{i:03d}-{label}.png")
        Image.fromarray(mnist_x[i * 500 % len(mnist_x), 0]).save(out / f"mnist-{i:03d}.png")


def cmd_reproduce(a: argparse.Namespace) -> int:
    from training.reproduce import HEADS, METHODS, _pm, reproduce

    heads = a.heads.split(",") if a.heads else list(HEADS)
    unknown = sorted(set(heads) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown head(s) {unknown}; choose from {', '.join(METHODS)}")
    result = reproduce(
        _config(a),
        _int_list(a.seeds),
        Path(a.runs_dir),
        Path(a.out),
        heads=heads,
        open_set=_int_list(a.open_set) if a.open_set else None,
        progress=not a.quiet,
        only_finished=a.only_finished,
    )
    for k, v in sorted(result["summary"].items(), key=lambda kv: -kv[1]["auroc_mean"]):
        print(
            f"{k:26s} accuracy {_pm(v['accuracy_mean'], v['accuracy_std'])}  mean AUROC {_pm(v['auroc_mean'], v['auroc_std'])}"
        )
    print(f"report: {Path(a.out) / 'reproduction.md'}")
    return 0


def _add_ood_folder_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ood-folder",
        action="append",
        metavar="NAME=DIR",
        help="also score the images under DIR as OOD set NAME (repeatable)",
    )


# What `add_subparsers` returns (argparse names its type only privately).
_Subcommands = argparse._SubParsersAction


def _add_train_command(sub: _Subcommands) -> None:
    """`isomax train`: a model into a run directory."""
    p = sub.add_parser("train", help="train a model into a run directory")
    _add_train_args(p)
    p.add_argument(
        "--out", default=None, help="run directory (default runs/<dataset>-<arch>-<head>-s<seed>)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _add_evaluate_command(sub: _Subcommands) -> None:
    """`isomax evaluate`: accuracy, OOD metrics and plots of a trained run."""
    p = sub.add_parser("evaluate", help="accuracy, OOD metrics and plots of a trained run")
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default="best.pt")
    p.add_argument("--ood", default=None, help="comma-separated OOD sets (default: all)")
    p.add_argument("--out", default=None, help="report directory (default RUN_DIR/eval)")
    _add_ood_folder_arg(p)
    p.set_defaults(func=cmd_evaluate)


def _add_export_command(sub: _Subcommands) -> None:
    """`isomax export`: a run to a calibrated bundle."""
    p = sub.add_parser(
        "export", help="ONNX export + parity check + calibration -> models/<name>/<version>"
    )
    p.add_argument("run_dir")
    p.add_argument("--name", default=None, help="bundle name (default <dataset>-<head>)")
    p.add_argument("--version", default=None, help="default: next free integer")
    p.add_argument("--models-dir", default="models")
    p.add_argument("--checkpoint", default="best.pt")
    p.add_argument(
        "--target-tpr", type=float, default=0.95, help="fraction of in-distribution images to keep"
    )
    p.add_argument(
        "--ood",
        default=None,
        help="comma-separated OOD sets for the manifest metrics (default: all)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip test/OOD evaluation")
    p.add_argument(
        "--global-threshold",
        action="store_true",
        help="calibrate one threshold for all classes (default: one per predicted class too)",
    )
    p.add_argument(
        "--no-temperature",
        action="store_true",
        help="no temperature scaling: probability = softmax(logits) (default: a temperature "
        "fitted on the validation split)",
    )
    p.add_argument(
        "--score",
        default="auto",
        choices=[*SERVED_SCORES, "auto"],
        help="the served score the verdict is calibrated on: min_distance (IsoMax+'s MDS), "
        "entropic, mmles (DisMax's), mahalanobis (on the normalized features, fitted on the "
        "training split), or auto: the one with the best pseudo-OOD AUROC on the validation "
        "split (training/selection.py; no OOD data) (default: auto)",
    )
    _add_ood_folder_arg(p)
    p.add_argument("--description", default=None)
    p.set_defaults(func=cmd_export)


def _add_reproduce_command(sub: _Subcommands) -> None:
    """`isomax reproduce`: the paper's tables over seeds."""
    p = sub.add_parser(
        "reproduce", help="SoftMax vs IsoMax vs IsoMax+ over seeds (the paper's tables)"
    )
    _add_train_args(p)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument(
        "--heads",
        default=None,
        help="default: softmax,isomax,isomaxplus; also isomaxplus-paperinit",
    )
    p.add_argument(
        "--open-set",
        default=None,
        help="also train on these classes only and score the rest, e.g. 0,1,2,3,4,5",
    )
    p.add_argument("--runs-dir", default="runs", help="where runs are cached and resumed")
    p.add_argument(
        "--only-finished", action="store_true", help="report the finished runs, train nothing"
    )
    p.add_argument("--out", default="docs/results")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reproduce)


def _add_select_command(sub: _Subcommands) -> None:
    """`isomax select`: the run the choosing rule ships."""
    p = sub.add_parser(
        "select",
        help="which trained run (loss, recipe, augmentation) the choosing rule ships, from "
        "validation data and pseudo-OOD only",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN")
    p.add_argument("--json", default=None, help="also write the rule's record here")
    p.set_defaults(func=cmd_select)


def _add_data_command(sub: _Subcommands) -> None:
    """`isomax data`: check and describe the data sets."""
    p = sub.add_parser("data", help="check the data sets and describe them")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx directory")
    p.add_argument(
        "--samples", default=None, help="write sample PNGs (Fashion-MNIST and MNIST) here"
    )
    p.add_argument("-n", type=int, default=5, help="samples of each kind")
    p.add_argument(
        "--photos",
        default=None,
        metavar="DIR",
        help="instead: write a small photo folder (train/val/test classes + ood/) made from "
        "scikit-image's photographs, to try image-folder training",
    )
    p.set_defaults(func=cmd_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="isomax", description="Train, evaluate and export IsoMax+ models."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, other libraries' included"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_command(sub)
    _add_evaluate_command(sub)
    _add_export_command(sub)
    _add_reproduce_command(sub)
    _add_select_command(sub)
    _add_data_command(sub)
    for p in sub.choices.values():  # `isomax export RUN --verbose` as well as `isomax -v export`
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as isomax -v"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    configure_logging(a.verbose)
    try:
        return a.func(a)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"isomax {a.command}: error: {e}", file=sys.stderr)
        return 2
