"""`isomax capture`: list what the service captured, export it as an image folder to label.

    isomax capture list   --dir CAPTURE_DIR [--verdict ood|in] [--model NAME]
    isomax capture export --dir CAPTURE_DIR --out FOLDER [--verdict ood|in] [--model NAME]

The export is the image-folder layout `isomax train --dataset folder` reads, minus the labels:

    FOLDER/unlabeled/<verdict>/<predicted label>/<capture>.<ext>   the images, as received
    FOLDER/captures.csv                                            one row per image
    FOLDER/train/                                                  empty: label into it

Labeling is moving each image into `FOLDER/train/<class>/` (a class the model knows, or a
new one); images that belong to no class are left out (or kept as an OOD set). The predicted
label in the path is the model's guess, to speed sorting up, not a label. Then
`isomax train --dataset folder --data-dir FOLDER`, export, and the service picks the new
version up (docs/serving.md, "The retrain loop"). Nothing here needs torch.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from service.capture import read_records

COLUMNS = (
    "file", "model", "version", "verdict", "label", "class_index", "min_distance", "threshold",
    "time",
)  # fmt: skip
_SAFE = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_dir_name(label: str) -> str:
    """A label as one directory name (labels like 'T-shirt/top' contain a slash)."""
    name = _SAFE.sub("_", label).strip(" .") or "_"
    return name[:100]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="isomax capture",
        description="List or export the inputs the service captured (ISOMAX_CAPTURE_DIR).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (
        ("list", "summary and one line per capture"),
        ("export", "copy the captures into an image folder ready to label"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("--dir", required=True, type=Path, help="the capture directory")
        s.add_argument("--verdict", choices=["ood", "in"], help="only OOD or in-distribution")
        s.add_argument("--model", help="only this model")
        if name == "export":
            s.add_argument("--out", required=True, type=Path, help="the folder to write")
        else:
            s.add_argument("--limit", type=int, default=50, help="lines to show (0: all)")
    return p


def _select(records: list[dict[str, Any]], a: argparse.Namespace) -> list[dict[str, Any]]:
    return [
        r
        for r in records
        if (a.verdict is None or r.get("verdict") == a.verdict)
        and (a.model is None or r.get("model") == a.model)
    ]


def cmd_list(a: argparse.Namespace) -> int:
    records = _select(read_records(a.dir), a)
    by = Counter((r.get("model"), r.get("version"), r.get("verdict")) for r in records)
    print(f"{len(records)} captures in {a.dir}")
    for (model, version, verdict), n in sorted(by.items(), key=str):
        print(f"  {model}:{version} {verdict}: {n}")
    shown = records if a.limit == 0 else records[-a.limit :]
    if shown:
        print(f"{'time':32} {'verdict':7} {'min_distance':>12} {'threshold':>9}  label  file")
    for r in shown:
        print(
            f"{r.get('time', ''):32} {r.get('verdict', ''):7} {r.get('min_distance', 0):12.4f} "
            f"{r.get('threshold', 0):9.4f}  {r.get('label', '')}  {r['file']}"
        )
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    records = _select(read_records(a.dir), a)
    out: Path = a.out
    (out / "train").mkdir(parents=True, exist_ok=True)
    rows = []
    for r in records:
        src = a.dir / Path(r["file"]).name  # the record's own name, never a path
        if not src.is_file():
            continue  # evicted between listing and copying
        verdict = "ood" if r.get("verdict") == "ood" else "in"
        dest_dir = out / "unlabeled" / verdict / safe_dir_name(str(r.get("label", "unknown")))
        dest_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest_dir / src.name)
        rows.append(
            {c: r.get(c) for c in COLUMNS} | {"file": str(dest_dir.relative_to(out) / src.name)}
        )
    with open(out / "captures.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    print(
        f"exported {len(rows)} images to {out}/unlabeled/ (captures.csv lists them); label "
        f"by moving each into {out}/train/<class>/, then: "
        f"isomax train --dataset folder --data-dir {out}"
    )
    return 0


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    if not a.dir.is_dir():
        print(f"isomax capture: {a.dir} is not a directory", file=sys.stderr)
        return 2
    return cmd_list(a) if a.command == "list" else cmd_export(a)
