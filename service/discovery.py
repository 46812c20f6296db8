"""What is on disk: version directories, model names, the configured entries, path safety.

Nothing here opens a graph or holds state: these are pure reads of the models directory, so
that the CLI's start-up check (`service/cli.py`), batch scoring (`isomax/batch/`), loading
(`service/loading.py`) and the registry's rescans (`service/registry.py`) all see the same
layout, `models/<name>/<version>/{model.onnx, manifest.json}`, the same way.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from isomax.contract.manifest import MANIFEST_FILE, NAME_PATTERN, VERSION_PATTERN
from service.settings import Settings


class ConfigError(RuntimeError):
    """The configuration cannot serve anything (no models directory, unknown model name)."""


class ModelLoadError(RuntimeError):
    """One bundle cannot be served; the message says why (no server paths: clients see it)."""


@dataclass(frozen=True)
class BundleRef:
    name: str
    version: str
    path: Path

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def where(self) -> str:
        """The bundle's place inside the models directory, as messages show it."""
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """One configured entry: `name` (follows the newest versions) or `name:version` (pinned)."""

    name: str
    version: str | None = None

    @property
    def key(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


def _is_version(name: str) -> bool:
    return re.match(VERSION_PATTERN, name) is not None


def version_dirs(models_dir: Path, name: str) -> dict[str, Path]:
    """`models_dir/name/<version>` directories on disk now, by version (empty if none)."""
    model_dir = models_dir / name
    try:
        entries = list(os.scandir(model_dir))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {
        e.name: Path(e.path)
        for e in entries
        if _is_version(e.name) and e.is_dir(follow_symlinks=True)
    }


def model_names(models_dir: Path) -> list[str]:
    return sorted(
        p.name for p in models_dir.iterdir() if p.is_dir() and re.match(NAME_PATTERN, p.name)
    )


def configured(models_dir: Path, wanted: tuple[str, ...] = ()) -> list[ModelSpec]:
    """The entries to serve: those in `wanted`, or every model found (ConfigError if none)."""
    if not models_dir.is_dir():
        raise ConfigError(f"models directory {models_dir} does not exist")
    found = {n: version_dirs(models_dir, n) for n in model_names(models_dir)}
    found = {n: v for n, v in found.items() if v}
    specs: list[ModelSpec] = []
    for want in wanted or tuple(found):
        name, _, version = want.partition(":")
        if name not in found:
            raise ConfigError(
                f"model {name!r} not found in {models_dir} (found: {sorted(found) or 'none'})"
            )
        if version and version not in found[name]:
            raise ConfigError(
                f"model {name!r} has no version {version} (found: {sorted(found[name])})"
            )
        spec = ModelSpec(name, version or None)
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise ConfigError(
            f"no bundles in {models_dir}: expected <name>/<version>/{{model.onnx, {MANIFEST_FILE}}}"
        )
    return specs


def discover(models_dir: Path, wanted: tuple[str, ...] = ()) -> list[BundleRef]:
    """The bundles start-up tries first: newest version of every entry, or the pinned one."""
    refs: list[BundleRef] = []
    for spec in configured(models_dir, wanted):
        versions = version_dirs(models_dir, spec.name)
        version = spec.version or max(versions, key=int)
        ref = BundleRef(spec.name, version, versions[version])
        if ref not in refs:
            refs.append(ref)
    return refs


def check_config(refs: list[BundleRef] | list[ModelSpec], settings: Settings) -> None:
    """What only the discovered bundles can tell about the settings (ConfigError if wrong)."""
    names = sorted({r.name for r in refs})
    unknown = set(settings.target_tpr) - set(names)
    if unknown:
        raise ConfigError(
            f"target_tpr names models that are not served: {sorted(unknown)} (serving {names})"
        )


def check_inside(ref: BundleRef, models_dir: Path, allow_symlinks: bool, *files: str) -> None:
    """Refuse a bundle directory or file that resolves outside the models directory.

    Symbolic links inside the directory are fine (resolved, they stay in it); one that leaves
    it is refused unless `allow_symlinks`, so that whoever can write a link cannot make the
    server load (and report on) a file elsewhere on the host.
    """
    if allow_symlinks:
        return
    root = models_dir.resolve()
    for rel in ("", *files):
        path = ref.path / rel if rel else ref.path
        if not path.exists() and not path.is_symlink():
            continue  # reported as missing by the caller
        if not path.resolve().is_relative_to(root):
            what = f"{ref.where}/{rel}" if rel else ref.where
            raise ModelLoadError(
                f"{what} is a symbolic link out of the models directory; refused "
                "(ISOMAX_ALLOW_SYMLINKS=true allows it)"
            )


# (stat of the directory, of the manifest, (name, stat) per file)
Fingerprint = tuple[object, ...]


def fingerprint(path: Path) -> Fingerprint:
    """What changes when a bundle's files are replaced or finish copying (not their content).

    The registry compares it between rescans: a failed version is retried only when this
    changes, and a loaded one whose files change in place is reported (versions are immutable).
    """

    def one(p: Path) -> tuple[int, int, int] | None:
        try:
            st = p.stat()
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    # Every file of the version directory, not a fixed list: the graph's name is the manifest's
    # `onnx.file`, which need not be `model.onnx`.
    try:
        names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    except OSError:
        names = []
    return (one(path), one(path / MANIFEST_FILE), *((n, one(path / n)) for n in names))
