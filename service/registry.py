"""The model registry: which bundle versions are loaded, which one answers, and hot reload.

Loading happens in one background thread per worker process (the "model manager"), never on
the request path. The registry's state is one immutable `RegistryState`
(`service/registry_state.py`): the manager builds a new one and replaces the old with one
reference assignment, so a request sees either the old set of versions or the new one, with
the readiness and errors that go with it.

Policy (docs/serving.md, "Model versions and hot reload"):
- A configured `name` follows its newest versions: the registry keeps the `keep_versions`
  highest versions that load, and `?model=name` gets the highest of them. A version that fails
  never replaces a working one; its reason is reported and it is retried only when its files
  change. A configured `name:version` pins exactly that version.
- The manager rescans `models/<name>/` every `reload_interval_s` (0: never), on SIGHUP and on
  `POST /admin/reload`; new version directories are loaded and swapped in, removed ones are
  retired once the requests that hold them have finished.
- A model is ready when it has a working version; one with none left and nothing loading has
  failed permanently (503 without Retry-After) until its directory changes.
- With no models named in the configuration (ISOMAX_MODELS empty), a rescan also picks up new
  `models/<name>/` directories that hold a version: loaded with the same checks, swapped in when
  they work. Such a model never makes a ready service unready (a broken bundle dropped in must
  not take the served ones out of rotation: /readyz shows its state, /models its error), and
  leaves the served set again when its directory is removed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from service.descriptors import is_out_of_descriptors, out_of_descriptors
from service.discovery import (
    BundleRef,
    Fingerprint,
    ModelLoadError,
    ModelSpec,
    check_config,
    fingerprint,
    model_names,
    version_dirs,
)
from service.errors import InvalidParameterError
from service.loading import load_model
from service.metrics import PrometheusMetrics
from service.registry_state import EntryState, ModelStatus, RegistryState
from service.serving import (
    RETIRE_GRACE_S,
    LoadedModel,
    Retirement,
    put_in_service,
    served_gauges,
)
from service.settings import Settings

log = logging.getLogger(__name__)


class ModelRegistry:
    """Every configured entry with its versions; resolves `?model=` for /classify.

    Public reads (`resolve`, `statuses`, `entries`, `ready`) are safe from the event loop
    while the manager thread loads: they read the one `RegistryState`, replaced whole.
    """

    def __init__(
        self,
        specs: list[ModelSpec] | list[BundleRef],
        settings: Settings,
        metrics: PrometheusMetrics,
        models_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models_dir = Path(models_dir or settings.models_dir)
        wanted = [s if isinstance(s, ModelSpec) else ModelSpec(s.name, s.version) for s in specs]
        if specs and isinstance(specs[0], BundleRef) and not settings.models:
            # Refs from discover() without ISOMAX_MODELS: follow the newest, as configured().
            wanted = list(dict.fromkeys(ModelSpec(s.name) for s in wanted))
        check_config(wanted, settings)
        names = sorted({s.name for s in wanted})
        # Start-up's models gate readiness; models picked up later do not (module docstring).
        self._startup_names = frozenset(names)
        # Requests without `model` keep going to the one start-up model when others join later.
        self._sole = names[0] if len(names) == 1 else None
        self._follow_dir = not settings.models
        # First the versions start-up will try first, so that /models shows them as loading
        # from the start.
        self._state = RegistryState(tuple(wanted), self._first_versions(wanted))
        self._retiring = Retirement()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loaded = threading.Event()  # the first pass is over
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._requested = 0  # reload requests so far
        self._served = 0  # the highest request number a finished pass started after
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[], None]] = []
        for name in names:
            metrics.add_model(name)

    def _first_versions(self, specs: list[ModelSpec]) -> dict[str, ModelStatus]:
        """The version each entry tries first (its pinned one, or the newest), as loading."""
        first: dict[str, ModelStatus] = {}
        for spec in specs:
            on_disk = version_dirs(self.models_dir, spec.name)
            version = spec.version or max(on_disk, key=int, default=None)
            if version in on_disk:
                ref = BundleRef(spec.name, version, on_disk[version])
                first[ref.key] = ModelStatus(ref)
        return first

    # -- reads (event loop) -------------------------------------------------------------------

    @property
    def specs(self) -> tuple[ModelSpec, ...]:
        """The configured entries, with the models picked up since start-up."""
        return self._state.specs

    @property
    def statuses(self) -> dict[str, ModelStatus]:
        """Every version directory tried or loaded, by `name:version`."""
        return self._state.versions

    @property
    def entries(self) -> dict[str, EntryState]:
        """Every configured entry (`name` or `name:version`) with its state."""
        return self._state.entries

    @property
    def ready(self) -> bool:
        """Every entry configured at start-up has a working version."""
        return all(
            e.status == "ready"
            for k, e in self._state.entries.items()
            if k.partition(":")[0] in self._startup_names
        )

    @property
    def loaded(self) -> bool:
        """The first pass is over: every entry has a working version or has failed."""
        return self._loaded.is_set()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (in the manager thread) after every pass that changed something."""
        self._listeners.append(listener)

    def resolve(self, model: str | None, version: str | None = None) -> LoadedModel:
        """`name`, `name:version` or None (only when one model name is served); `version` pins.

        A request that names nothing served gets the error `RegistryState.refusal` gives.
        """
        name, _, pinned = (model or "").partition(":")
        state = self._state  # one snapshot for the lookup and for the error
        if not name:  # `?version=` alone, or nothing: the one model served (at start-up)
            sole = self._sole or (state.names[0] if len(state.names) == 1 else None)
            if sole is None:
                raise InvalidParameterError(
                    f"model is required: this service serves {', '.join(state.names)}"
                )
            name = sole
        if version and pinned and version != pinned:
            raise InvalidParameterError(
                f"model {model!r} names version {pinned} but version={version!r}"
            )
        version = version or pinned
        found = state.by_key.get(f"{name}:{version}") if version else state.by_name.get(name)
        if found is not None:
            return found
        raise state.refusal(name, version, self.loaded)

    # -- the manager thread -------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the manager thread: first load, then rescans (interval, SIGHUP, admin)."""
        self._loop = loop
        self._thread = threading.Thread(target=self._manage, name="model-manager", daemon=True)
        self._thread.start()

    def request_reload(self) -> int:
        """Ask the manager for a rescan (SIGHUP, admin endpoint); returns the request number."""
        with self._cond:
            self._requested += 1
            n = self._requested
        self._wake.set()
        return n

    def wait_reload(self, n: int, timeout: float) -> bool:
        """Block until a pass that started after request `n` has finished."""
        with self._cond:
            return self._cond.wait_for(lambda: self._served >= n, timeout)

    def _manage(self) -> None:
        interval = self.settings.reload_interval_s
        while not self._stop.is_set():
            with self._cond:
                started_for = self._requested
            try:
                self._pass()
            except Exception as e:  # a bug must not end reloading, nor crash the worker
                if is_out_of_descriptors(e):  # not a bug: one line, not a traceback per pass
                    out_of_descriptors.warn("the model rescan")
                else:
                    log.exception("model registry: rescan failed")
            finally:
                self._loaded.set()
                with self._cond:
                    self._served = started_for
                    self._cond.notify_all()
            timeout = interval if interval > 0 else None
            if self._retiring:
                timeout = min(timeout or RETIRE_GRACE_S, RETIRE_GRACE_S / 2)
            self._wake.wait(timeout)
            self._wake.clear()
            self._retiring.stop_idle()

    def _pass(self) -> None:
        """Scan the models directory once: per model, load, swap in, retire; then notify."""
        changed = self._follow_dir and self._pick_up_new_models()
        for name in self._state.names:
            versions = dict(self._state.versions)
            changed |= self._scan_model(name, versions)
            changed |= self._swap(self._state.with_versions(versions))
        if self._follow_dir:
            changed |= self._drop_removed_models()
        self._update_metrics()
        if changed:
            for listener in self._listeners:
                try:
                    listener()
                except Exception:
                    log.exception("model registry: change listener failed")

    def _pick_up_new_models(self) -> bool:
        """New `models/<name>/` directories holding a version join as configured `name`s."""
        try:
            found = model_names(self.models_dir)
        except OSError:  # the directory itself went away: nothing new, the rest is as before
            return False
        state = self._state
        new = [n for n in found if n not in state.names and version_dirs(self.models_dir, n)]
        for name in new:
            log.info("model %s: new model directory, loading it", name)
            self.metrics.add_model(name)
        if new:
            specs = [ModelSpec(n) for n in new]
            versions = {**state.versions, **self._first_versions(specs)}
            self._swap(RegistryState((*state.specs, *specs), versions))
        return bool(new)

    def _drop_removed_models(self) -> bool:
        """Models picked up after start-up leave the served set when their directory is gone."""
        state = self._state
        gone = {
            n
            for n in state.names
            if n not in self._startup_names
            and not version_dirs(self.models_dir, n)
            and not state.of(n)
        }
        for name in gone:
            log.info("model %s: model directory removed, no longer served", name)
            self.metrics.model_ready.labels(name).set(0)
        if gone:
            self._swap(state.with_specs(tuple(s for s in state.specs if s.name not in gone)))
        return bool(gone)

    def _swap(self, new: RegistryState) -> bool:
        """Make `new` the state requests read; queue the versions that left it for retirement.

        True if the served versions or any entry's state changed.
        """
        old, self._state = self._state, new  # the swap: one reference assignment
        served_changed = new.by_key != old.by_key or new.by_name != old.by_name
        if served_changed:
            for key, model in old.by_key.items():
                if new.by_key.get(key) is not model:
                    self._retiring.add(model)
            for name, model in new.by_name.items():
                if old.by_name.get(name) is not model:
                    log.info("model %s: %s now answers ?model=%s", name, model.ref.key, name)
        return served_changed or new.entries != old.entries

    def _scan_model(self, name: str, versions: dict[str, ModelStatus]) -> bool:
        """Bring one model's versions in line with its directory; True if anything changed."""
        changed = False
        on_disk = version_dirs(self.models_dir, name)
        # Removed directories: drop their state (a loaded one is retired by the swap).
        for key in [k for k, st in versions.items() if st.ref.name == name]:
            if versions[key].ref.version not in on_disk:
                log.info("model %s: version directory removed", key)
                del versions[key]
                changed = True
        specs = self._state.specs
        pinned = {s.version for s in specs if s.name == name and s.version is not None}
        follow = any(s.name == name and s.version is None for s in specs)
        keep = self.settings.keep_versions
        working: list[str] = []
        for version in sorted(on_disk, key=int, reverse=True):
            wanted = version in pinned or (follow and len(working) < keep)
            key = f"{name}:{version}"
            st = versions.get(key)
            if not wanted:
                if st is not None and st.status == "ready":  # pushed out by newer versions
                    log.info("model %s: unloaded (newer versions serve)", key)
                    del versions[key]
                    changed = True
                continue
            fp = fingerprint(on_disk[version])
            if st is not None and st.status == "ready":
                if st.fingerprint != fp and fp[0] is not None:
                    log.warning(
                        "model %s: files changed in place; versions are immutable, the loaded "
                        "one keeps serving (put the change in a new version directory)",
                        key,
                    )
                    versions[key] = replace(st, fingerprint=fp)
                working.append(version)
                continue
            if st is not None and st.status == "failed" and st.fingerprint == fp:
                continue  # same files as the failed attempt: not retried
            changed = True
            versions[key] = self._load(BundleRef(name, version, on_disk[version]), fp)
            if versions[key].status == "ready":
                working.append(version)
        return changed

    def _load(self, ref: BundleRef, fp: Fingerprint) -> ModelStatus:
        """Load `ref` and put it into service; its state, ready or failed with the reason.

        "loading" is published while it warms up (/models shows it), a failure at once; a
        working version joins the served set when its model's scan is over (`_pass`).
        """
        loading = ModelStatus(ref, "loading", fingerprint=fp)
        self._swap(self._state.with_versions({**self._state.versions, ref.key: loading}))
        assert self._loop is not None, "start() first"
        try:
            bundle = load_model(ref, self.settings, self.models_dir)
            model = put_in_service(bundle, self.settings, self.metrics, self._loop)
        except Exception as e:
            if isinstance(e, ModelLoadError):
                log.error("model %s failed to load: %s", ref.key, e)
            else:  # a bug, but one bundle must not take the others down
                log.exception("model %s failed to load", ref.key)
            error = (
                str(e) if isinstance(e, ModelLoadError) else f"internal error ({type(e).__name__})"
            )
            failed = replace(loading, status="failed", error=error)
            self._swap(self._state.with_versions({**self._state.versions, ref.key: failed}))
            self.metrics.load_failures.labels(ref.name).inc()
            return failed
        self.metrics.loads.labels(ref.name).inc()
        log.info(
            "model %s ready on %s in %.2f s: threshold %.4f%s (target_tpr %.3f), %d labels, "
            "warmed up batch sizes 1-%d",
            ref.key, model.provider, model.load_seconds, model.thresholds.overall,
            "" if model.thresholds.per_class is None else " and one per class",
            model.thresholds.target_tpr, len(model.labels), self.settings.max_batch_size,
        )  # fmt: skip
        return replace(loading, status="ready", model=model)

    def _update_metrics(self) -> None:
        state = self._state
        served_gauges(self.metrics, state.names, state.by_name, state.by_key, self._retiring)

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._retiring.stop_idle(force=True, timeout=timeout)
        for model in self._state.by_key.values():
            model.batcher.stop(timeout)
