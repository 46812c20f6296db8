"""The registry's one picture of state, and why a request's model is not served.

One state per model version (`ModelStatus`), as Triton's model lifecycle keeps it, plus the
configured entries (`ModelSpec`). Everything requests and health checks read is derived from
those two when a `RegistryState` is built: the served versions by `name:version`, the default
version of each name, each entry's readiness (`EntryState`) and each version's `default` flag.
The manager thread builds a new `RegistryState` and swaps it in with one reference assignment,
so a reader sees one consistent picture, never the versions of one pass and the readiness of
another.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from service.discovery import BundleRef, Fingerprint, ModelSpec
from service.errors import (
    ModelUnavailableError,
    NotReadyError,
    ServiceError,
    UnknownModelError,
)
from service.serving import LoadedModel

Status = Literal["loading", "ready", "failed"]


@dataclass(frozen=True)
class ModelStatus:
    """One version directory as the registry sees it (kept while the directory exists)."""

    ref: BundleRef
    status: Status = "loading"
    error: str | None = None
    model: LoadedModel | None = None  # set when ready
    fingerprint: Fingerprint = ()
    default: bool = False  # `?model=name` gets this version (derived by RegistryState)


@dataclass(frozen=True)
class EntryState:
    """One configured entry (ModelSpec) for readiness: working, loading, or failed for good."""

    status: Status
    version: str | None = None  # the version `?model=` gets, when ready
    detail: str | None = None


class RegistryState:
    """What requests read: built whole from the entries and version states, never mutated."""

    __slots__ = ("by_key", "by_name", "entries", "names", "specs", "versions")

    def __init__(self, specs: tuple[ModelSpec, ...], versions: dict[str, ModelStatus]) -> None:
        self.specs = specs
        self.names: list[str] = sorted({s.name for s in specs})
        self.by_key: dict[str, LoadedModel] = {}  # name:version -> model, every served version
        self.by_name: dict[str, LoadedModel] = {}  # name -> its default (highest) version
        for st in versions.values():
            if st.model is not None and st.status == "ready":
                self.by_key[st.ref.key] = st.model
                best = self.by_name.get(st.ref.name)
                if best is None or int(st.ref.version) > int(best.version):
                    self.by_name[st.ref.name] = st.model
        self.versions: dict[str, ModelStatus] = {}  # name:version -> state, in discovery order
        for key, st in versions.items():
            default = st.model is not None and self.by_name.get(st.ref.name) is st.model
            self.versions[key] = st if st.default == default else replace(st, default=default)
        self.entries: dict[str, EntryState] = {s.key: self._entry(s) for s in specs}

    def with_versions(self, versions: dict[str, ModelStatus]) -> RegistryState:
        return RegistryState(self.specs, versions)

    def with_specs(self, specs: tuple[ModelSpec, ...]) -> RegistryState:
        return RegistryState(specs, self.versions)

    def of(self, name: str) -> list[ModelStatus]:
        """The version states of model `name`."""
        return [st for st in self.versions.values() if st.ref.name == name]

    def _entry(self, spec: ModelSpec) -> EntryState:
        if spec.version is not None:
            st = self.versions.get(f"{spec.name}:{spec.version}")
            if st is None:
                return EntryState("failed", None, f"{spec.key}: no version directory")
            detail = st.error and f"{spec.key}: {st.error}"
            return EntryState(st.status, spec.version if st.status == "ready" else None, detail)
        default = self.by_name.get(spec.name)
        if default is not None:
            return EntryState("ready", default.version)
        mine = self.of(spec.name)
        if any(st.status == "loading" for st in mine):
            return EntryState("loading")
        reasons = "; ".join(f"{st.ref.key}: {st.error}" for st in mine if st.error)
        return EntryState("failed", None, reasons or f"{spec.name}: no version directory")

    def refusal(self, name: str, version: str, loaded: bool) -> ServiceError:
        """Why `name` (`version`: that version, "": its default) is not served right now.

        Unknown names and versions that are not served: UnknownModelError (404). A model or
        version still loading (or the first pass not over, `loaded` False): NotReadyError (503 +
        Retry-After). One that failed and will not be retried until its files change:
        ModelUnavailableError (503, no Retry-After).
        """
        if name not in self.names:
            return UnknownModelError(
                f"unknown model {_short(name)!r}; serving {', '.join(self.names)}"
            )
        if version:
            st = self.versions.get(f"{name}:{version}")
            if st is None or st.status == "ready":  # ready but not served: just retired
                mine = [m.version for m in self.by_key.values() if m.name == name]
                served = sorted(mine, key=int, reverse=True)
                return UnknownModelError(
                    f"unknown model {_short(name + ':' + version)!r}: no version {_short(version)} "
                    f"of {name} is loaded (serving {', '.join(served) or 'none'})"
                )
            if st.status == "loading":
                return NotReadyError(f"model {st.ref.key} is loading")
            return ModelUnavailableError(
                f"model {st.ref.key} failed to load: {st.error}; it is not retried until "
                "its files change"
            )
        if not loaded or any(st.status == "loading" for st in self.of(name)):
            return NotReadyError(f"model {name} is loading")
        reasons = "; ".join(
            e.detail for k, e in self.entries.items() if k.split(":")[0] == name and e.detail
        )
        return ModelUnavailableError(
            f"model {name} failed permanently: {reasons or 'no working version'}; it is not "
            "retried until its version directories change"
        )


def _short(value: str, limit: int = 64) -> str:
    """A client's value, cut before it goes back in a message."""
    return value if len(value) <= limit else value[:limit] + "..."
