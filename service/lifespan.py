"""The app's lifespan: start-up makes the one `AppState`, shutdown stops what it started.

Start-up discovers the bundles (a configuration that cannot serve anything stops the process
there), then loads and warms them up in the registry's thread, so /healthz answers at once and
/readyz turns 200 when every bundle is ready. Shutdown (after uvicorn has finished the
in-flight requests) stops the batchers, the capture writer and the worker board.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from service.admission import BodyBudget
from service.capture import CaptureWriter
from service.descriptors import install_loop_handler
from service.discovery import configured
from service.metrics import PrometheusMetrics
from service.registry import ModelRegistry
from service.routes.models import worker_state
from service.settings import Settings
from service.state import AppState
from service.workers import WorkerBoard

log = logging.getLogger(__name__)

# How often each worker looks at the board's reload file (a stat; --workers N only).
RELOAD_WATCH_S = 0.5


class _Settable(Protocol):
    service: AppState | None


def lifespan(
    settings: Settings, metrics: PrometheusMetrics
) -> Callable[[_Settable], AbstractAsyncContextManager[None]]:
    """The lifespan of an app serving `settings`, its state set on `app.service`."""

    @asynccontextmanager
    async def run(app: _Settable) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        install_loop_handler(loop)  # EMFILE as one log line, not a traceback per accept
        state = start(settings, metrics, loop)
        app.service = state
        hup = _install_sighup(loop, state.registry)
        watcher = asyncio.ensure_future(_watch_reload(state)) if state.board.shared else None
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            if watcher is not None:
                watcher.cancel()
            await stop(state, loop)

    return run


def start(
    settings: Settings, metrics: PrometheusMetrics, loop: asyncio.AbstractEventLoop
) -> AppState:
    """Discover the bundles and start loading them; the capture writer; the worker board."""
    specs = configured(settings.models_dir, settings.models)
    registry = ModelRegistry(specs, settings, metrics)
    board = WorkerBoard(settings.state_dir, settings.workers)
    capture = CaptureWriter(settings, metrics) if settings.capture_dir is not None else None
    if capture is not None:
        capture.start()
    bodies = BodyBudget(settings.max_inflight_body_bytes)
    state = AppState(settings, metrics, registry, board, capture, bodies)

    def publish() -> None:
        board.publish(worker_state(registry))

    publish()
    registry.on_change(publish)
    registry.start(loop)
    return state


async def stop(state: AppState, loop: asyncio.AbstractEventLoop) -> None:
    await loop.run_in_executor(None, state.registry.close)
    if state.capture is not None:
        await loop.run_in_executor(None, state.capture.close)
    state.board.close()
    state.metrics.close()
    log.info("stopped")


def _install_sighup(loop: asyncio.AbstractEventLoop, registry: ModelRegistry) -> bool:
    """SIGHUP -> rescan the models directory (where the platform and loop allow it)."""

    def on_hup() -> None:
        log.info("SIGHUP: rescanning the models directory")
        registry.request_reload()

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        return False  # no SIGHUP (Windows) or not the main thread (TestClient)
    return True


async def _watch_reload(state: AppState) -> None:
    """Rescan when another worker's admin endpoint touched the board's reload file."""
    board = state.board
    seen = board.reload_stamp()
    while True:
        await asyncio.sleep(RELOAD_WATCH_S)
        stamp = board.reload_stamp()  # one stat(): cheaper than a hand-off to a thread
        if stamp != seen:
            seen = stamp
            state.registry.request_reload()
