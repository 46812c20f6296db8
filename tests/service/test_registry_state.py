"""The registry's one state: served set, defaults and readiness derived from the version states,
and the one error path (`RegistryState.refusal`) that every unserved request goes through."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.discovery import BundleRef, ModelSpec
from service.errors import ModelUnavailableError, NotReadyError, UnknownModelError
from service.loading import load_model
from service.metrics import PrometheusMetrics
from service.registry_state import ModelStatus, RegistryState
from service.serving import LoadedModel, put_in_service
from service.settings import Settings
from tests.service.bundles import write_bundle


def _ref(name: str, version: str) -> BundleRef:
    return BundleRef(name, version, Path("/nonexistent") / name / version)


def _state(*versions: ModelStatus, specs: tuple[str, ...] = ("m",)) -> RegistryState:
    wanted = tuple(ModelSpec(*s.split(":")) if ":" in s else ModelSpec(s) for s in specs)
    return RegistryState(wanted, {st.ref.key: st for st in versions})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LoadedModel]]:
    """Versions 1 and 2 of model `m`, loaded and put into service (real sessions, batchers)."""
    root = tmp_path_factory.mktemp("models")
    settings = Settings(models_dir=root, max_batch_size=2)
    loop = asyncio.new_event_loop()
    models: dict[str, LoadedModel] = {}
    for v in ("1", "2"):
        path = write_bundle(root, "m", v)
        bundle = load_model(BundleRef("m", v, path), settings)
        models[v] = put_in_service(bundle, settings, PrometheusMetrics(), loop)
    yield models
    for model in models.values():
        model.batcher.stop(5)
    loop.close()


def test_served_set_defaults_and_entries_come_from_the_version_states(
    served: dict[str, LoadedModel],
) -> None:
    v1, v2 = (ModelStatus(m.ref, "ready", model=m) for m in (served["1"], served["2"]))
    state = _state(v1, v2, ModelStatus(_ref("m", "3"), "failed", error="bad"), specs=("m", "m:1"))
    assert state.by_key == {"m:1": served["1"], "m:2": served["2"]}
    assert state.by_name["m"] is served["2"]  # the highest working version, not the newest dir
    assert {k: st.default for k, st in state.versions.items()} == {
        "m:1": False,
        "m:2": True,
        "m:3": False,
    }
    assert (state.entries["m"].status, state.entries["m"].version) == ("ready", "2")
    assert (state.entries["m:1"].status, state.entries["m:1"].version) == ("ready", "1")
    # Version 2 gone: the same versions minus one give the other default, in one new state.
    after = state.with_versions({k: st for k, st in state.versions.items() if k != "m:2"})
    assert after.by_name["m"] is served["1"] and after.versions["m:1"].default
    assert not state.versions["m:1"].default  # the old state is not changed


def test_entries_without_a_working_version() -> None:
    loading = _state(ModelStatus(_ref("m", "2")), ModelStatus(_ref("m", "1"), "failed", error="x"))
    assert loading.entries["m"].status == "loading"
    failed = _state(
        ModelStatus(_ref("m", "2"), "failed", error="sha256 differs"),
        ModelStatus(_ref("m", "1"), "failed", error="bad manifest"),
        specs=("m", "m:7"),
    )
    assert failed.entries["m"].status == "failed"
    assert failed.entries["m"].detail == "m:2: sha256 differs; m:1: bad manifest"
    assert failed.entries["m:7"].detail == "m:7: no version directory"


@pytest.mark.parametrize(
    ("versions", "name", "version", "loaded", "error", "message"),
    [
        ((), "other", "", True, UnknownModelError, "unknown model 'other'; serving m"),
        ((), "m", "4", True, UnknownModelError, "no version 4 of m is loaded (serving none)"),
        ((ModelStatus(_ref("m", "4")),), "m", "4", True, NotReadyError, "model m:4 is loading"),
        (
            (ModelStatus(_ref("m", "4"), "failed", error="sha256 differs"),),
            "m",
            "4",
            True,
            ModelUnavailableError,
            "model m:4 failed to load: sha256 differs; it is not retried until its files change",
        ),
        ((ModelStatus(_ref("m", "4")),), "m", "", True, NotReadyError, "model m is loading"),
        ((), "m", "", False, NotReadyError, "model m is loading"),  # first pass not over
        (
            (ModelStatus(_ref("m", "4"), "failed", error="bad"),),
            "m",
            "",
            True,
            ModelUnavailableError,
            "model m failed permanently: m:4: bad; it is not retried until its version",
        ),
    ],
    ids=[
        "unknown-name",
        "version-not-served",
        "version-loading",
        "version-failed",
        "model-loading",
        "first-pass",
        "model-failed",
    ],
)
def test_refusal_names_the_state_of_what_was_asked(
    versions: tuple[ModelStatus, ...],
    name: str,
    version: str,
    loaded: bool,
    error: type[Exception],
    message: str,
) -> None:
    refusal = _state(*versions).refusal(name, version, loaded)
    assert type(refusal) is error
    assert message in str(refusal)


def test_a_long_client_value_is_cut_in_the_message() -> None:
    refusal = _state().refusal("x" * 500, "", True)
    assert str(refusal) == f"unknown model '{'x' * 64}...'; serving m"
