"""Model state shared by the worker processes, so that /readyz and /models answer for all.

With `isomax serve --workers N` every worker is its own process with its own registry (each
loads and hot-reloads on its own); a request reaches one of them. Each worker writes its state
(JSON: entries, versions) to `<state_dir>/worker-<pid>.json` whenever it changes, atomically
(write then rename), and whichever worker answers /readyz or /models reads every live worker's
file. A file whose process is gone is ignored and removed. The files are a few KB, rewritten
only on change: a tmpfs (`/dev/shm`, a compose tmpfs mount) is the natural place.

`POST /admin/reload` reaches one worker too: it touches `<state_dir>/reload` and every worker
polls that file's mtime (twice a second) and rescans when it moves.

Without a state dir (one worker) the board keeps the one state in memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_PREFIX = "worker-"
RELOAD_FILE = "reload"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkerBoard:
    def __init__(self, state_dir: Path | None, workers: int = 1) -> None:
        self.state_dir = state_dir
        self.workers = workers
        self.pid = os.getpid()
        self._own: dict[str, Any] = {}
        if state_dir is not None:
            state_dir.mkdir(parents=True, exist_ok=True)

    @property
    def shared(self) -> bool:
        return self.state_dir is not None

    def _path(self, pid: int) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"{STATE_PREFIX}{pid}.json"

    def publish(self, state: dict[str, Any]) -> None:
        """This worker's state (JSON-able); called from any thread."""
        state = {**state, "pid": self.pid, "time": time.time()}
        self._own = state
        if self.state_dir is None:
            return
        path = self._path(self.pid)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(state))
            os.replace(tmp, path)
        except OSError as e:
            log.error("cannot publish this worker's model state: %s", e)

    def collect(self) -> list[dict[str, Any]]:
        """Every live worker's state, this worker's first."""
        if self.state_dir is None:
            return [self._own] if self._own else []
        states = [self._own] if self._own else []
        for path in sorted(self.state_dir.glob(f"{STATE_PREFIX}*.json")):
            try:
                pid = int(path.stem[len(STATE_PREFIX) :])
            except ValueError:
                continue
            if pid == self.pid:
                continue
            if not _alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            try:
                states.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # removed meanwhile; a rename never shows a half-written file
        return states

    def close(self) -> None:
        if self.state_dir is not None:
            with contextlib.suppress(OSError):
                self._path(self.pid).unlink()

    def touch_reload(self) -> None:
        """Ask every worker to rescan (the admin endpoint reaches only one of them)."""
        if self.state_dir is not None:
            path = self.state_dir / RELOAD_FILE
            path.write_text(f"{time.time_ns()} {self.pid}\n")

    def reload_stamp(self) -> int:
        if self.state_dir is None:
            return 0
        try:
            return (self.state_dir / RELOAD_FILE).stat().st_mtime_ns
        except OSError:
            return 0


ORDER = {"ready": 0, "loading": 1, "failed": 2}


def merge_entries(states: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per configured entry, the worst state over the workers (ready only if ready in all)."""
    merged: dict[str, dict[str, Any]] = {}
    for state in states:
        for key, entry in state.get("entries", {}).items():
            have = merged.get(key)
            if have is None or ORDER[entry["status"]] > ORDER[have["status"]]:
                merged[key] = dict(entry)
    return merged


def merge_models(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per `name:version`, one description: the worst status, and how many workers have it ready.

    A version some workers serve and others do not (yet) reads as `loading` with
    `workers_ready` < `workers`: a rollout in progress.
    """
    out: dict[str, dict[str, Any]] = {}
    ready: dict[str, int] = {}
    seen: dict[str, int] = {}
    for state in states:
        for info in state.get("models", []):
            key = f"{info['name']}:{info['version']}"
            seen[key] = seen.get(key, 0) + 1
            ready[key] = ready.get(key, 0) + (info["status"] == "ready")
            have = out.get(key)
            if have is None or (have["status"] != "ready" and info["status"] == "ready"):
                out[key] = dict(info, status=have["status"] if have else info["status"])
            if ORDER[info["status"]] > ORDER[out[key]["status"]]:
                out[key]["status"] = info["status"]
                out[key]["error"] = info.get("error")
            out[key]["default"] = out[key].get("default", False) or info.get("default", False)
    n = len(states)
    for key, info in out.items():
        if n > 1:
            info["workers"] = n
            info["workers_ready"] = ready[key]
        if seen[key] < n and info["status"] == "ready":
            info["status"] = "loading"  # not (yet) loaded in every worker
    return sorted(out.values(), key=lambda i: (i["name"], -int(i["version"])))
