"""Files generated from one source of truth: write them, or check the committed ones are current.

    sys.exit(write_or_check(render, "scripts/drift_rules.py", __doc__))

One implementation of the `--check` command line that every generator here shares
(scripts/drift_rules.py, scripts/k8s_prometheus_rule.py, tests/deploy/drift_rule_tests.py),
and of the YAML style they write: PromQL and descriptions as literal blocks, as written.
Importable as `generated` wherever scripts/ is on sys.path (a script's own folder is).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def write_or_check(
    render: Callable[[], Mapping[Path, str]],
    command: str,
    doc: str | None,
    argv: list[str] | None = None,
) -> int:
    """Write every file `render` gives, or with `--check` exit 1 if any differs on disk.

    `command` is how to regenerate them (said when they are out of date); `doc` the
    generator's docstring, whose first line describes the command line.
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    p.add_argument("--check", action="store_true", help="exit 1 if a file is out of date")
    args = p.parse_args(argv)
    files = render()
    if args.check:
        stale = [f for f, text in files.items() if not f.exists() or f.read_text() != text]
        for f in stale:
            print(f"{_shown(f)} is out of date: run {command}")
        return 1 if stale else 0
    for f, text in files.items():
        f.write_text(text)
        print(f"wrote {_shown(f)}")
    return 0


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (PromQL expressions, descriptions) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


LiteralDumper.add_representer(str, _str)
