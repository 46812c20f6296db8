"""The output folder: rows in parts, each written atomically, and what a restart reads back.

    OUT/_run.json            the model and settings the rows were scored with
    OUT/part-000000.parquet  rows, in parts of `part_size` (or .jsonl / .csv)
    OUT/summary.{txt,json,png}

A part is written to a temporary name in OUT and renamed into place (`os.replace`, atomic on
one filesystem), so that a reader, a Ctrl-C or a kill never sees half a part. A restart with
the same OUT reads the `path` column of the parts present and scores only the other files:
no row is written twice, none is lost. `_run.json` makes a restart with another model or
operating point refuse to mix its rows with the old ones.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from isomax.batch.scoring import COLUMNS

log = logging.getLogger(__name__)

RUN_FILE = "_run.json"

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("class", pa.int32()),
        ("label", pa.string()),
        ("probability", pa.float64()),
        ("score", pa.float64()),
        ("min_distance", pa.float64()),
        ("threshold", pa.float64()),
        ("is_ood", pa.bool_()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("error", pa.string()),
    ]
)
assert tuple(SCHEMA.names) == COLUMNS


def _write_jsonl(table: pa.Table, path: Path) -> None:
    with open(path, "wb") as f:
        for row in table.to_pylist():
            f.write(json.dumps(row).encode() + b"\n")


def _read_parquet(path: Path, columns: list[str] | None) -> pa.Table:
    return pq.read_table(path, columns=columns, schema=SCHEMA)


def _read_csv(path: Path, columns: list[str] | None) -> pa.Table:
    opts = pa_csv.ConvertOptions(
        column_types=SCHEMA, include_columns=columns, strings_can_be_null=True
    )
    return pa_csv.read_csv(path, convert_options=opts)


def _read_jsonl(path: Path, columns: list[str] | None) -> pa.Table:
    return pa_json.read_json(path, parse_options=pa_json.ParseOptions(explicit_schema=SCHEMA))


# Each part format, once: how a part is written, and read back with the output's types.
_WRITERS: dict[str, Callable[[pa.Table, Path], None]] = {
    "parquet": pq.write_table,
    "jsonl": _write_jsonl,
    "csv": pa_csv.write_csv,
}
_READERS: dict[str, Callable[[Path, list[str] | None], pa.Table]] = {
    "parquet": _read_parquet,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
}
FORMATS = tuple(_WRITERS)
_PART = re.compile(rf"^part-(\d{{6}})\.({'|'.join(FORMATS)})$")


class OutputMismatchError(RuntimeError):
    """OUT holds rows scored with another model, operating point or format."""


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a table of the output's schema, column by column: `Table.from_pylist` took many
    times longer, as much as decoding a small PNG (bench/results/serving-log.md, "Measurements behind code choices")."""
    columns = [pa.array([r[f.name] for r in rows], f.type) for f in SCHEMA]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


class PartWriter:
    """Writes tables as the next parts of OUT; `done` is the paths already there."""

    def __init__(self, out: Path, fmt: str, run: dict[str, Any]) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.out = Path(out)
        self.fmt = fmt
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_run({**run, "format": fmt})
        for tmp in self.out.glob(".part-*.tmp"):  # left by a kill: never renamed, so no rows
            tmp.unlink()
        parts = part_files(self.out)
        self.next = 1 + max((int(_PART.match(p.name)[1]) for p in parts), default=-1)  # type: ignore[index]
        self.done: set[str] = set()
        for p in parts:
            self.done.update(read_part(p, columns=["path"]).column("path").to_pylist())

    def _check_run(self, run: dict[str, Any]) -> None:
        path = self.out / RUN_FILE
        if path.exists():
            old = json.loads(path.read_text())
            if old != run:
                diff = sorted(k for k in set(old) | set(run) if old.get(k) != run.get(k))
                raise OutputMismatchError(
                    f"{self.out} holds rows scored with other settings ({', '.join(diff)} "
                    "differ): use another --out, or delete it to start again"
                )
            return
        text = json.dumps(run, indent=2) + "\n"
        _atomic_write(path, lambda tmp: tmp.write_text(text))

    def write(self, table: pa.Table) -> Path | None:
        """`table` as the next part (atomically); None for an empty table."""
        if table.num_rows == 0:
            return None
        path = self.out / f"part-{self.next:06d}.{self.fmt}"
        write = _WRITERS[self.fmt]
        _atomic_write(path, lambda tmp: write(table, tmp))
        self.next += 1
        self.done.update(table.column("path").to_pylist())
        return path


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to `.NAME.tmp` beside `path`, flushed to disk, then renamed to `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def part_files(out: Path) -> list[Path]:
    return sorted(p for p in Path(out).iterdir() if _PART.match(p.name))


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    """One part with the output's types, whatever its format."""
    table = _READERS[path.suffix.lstrip(".")](path, columns)
    return table.select(columns) if columns else table


def read_rows(out: Path, columns: Iterable[str] | None = None) -> pa.Table:
    """Every row of OUT, in the order of its parts."""
    cols = list(columns) if columns is not None else None
    tables = [read_part(p, cols) for p in part_files(out)]
    schema = SCHEMA if cols is None else pa.schema([SCHEMA.field(c) for c in cols])
    return pa.concat_tables(tables) if tables else schema.empty_table()
