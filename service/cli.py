"""`isomax serve`: run the service with uvicorn. Flags override ISOMAX_* environment variables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from service.discovery import ConfigError, check_config, discover
from service.metrics import MULTIPROC_ENV, multiprocess_dir
from service.settings import Settings, unknown_env

log = logging.getLogger("service")


def _target_tpr(value: str) -> tuple[str, float]:
    name, sep, tpr = value.partition("=")
    try:
        if not sep:
            raise ValueError
        return name, float(tpr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=TPR, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="isomax serve",
        description="Serve the bundles of a models directory over HTTP (POST /classify). "
        "Every option can also be set as an ISOMAX_<OPTION> environment variable "
        "(e.g. ISOMAX_MAX_BATCH_SIZE=64); flags win. The limits (ISOMAX_MAX_BODY_BYTES, ...) "
        "are environment variables only; docs/serving.md lists them all.",
    )
    a = p.add_argument
    a("--host", help="bind address (default 127.0.0.1)")
    a("--port", type=int, help="port (default 8000; 0 picks a free one)")
    a("--models-dir", help="models directory: <name>/<version>/{model.onnx, manifest.json}")
    a("--models", help="comma-separated 'name' or 'name:version' to serve (default: all)")
    a("--device", choices=["auto", "cpu", "cuda"], help="onnxruntime device (default auto)")
    a("--workers", type=int, help="uvicorn worker processes (default 1)")
    a(
        "--intra-op-threads",
        type=int,
        help="onnxruntime threads per model (0: by the model's cost, service/sessions.py)",
    )
    a("--max-batch-size", type=int, help="images per onnxruntime run at most (default 32)")
    a("--max-wait-ms", type=float, help="longest wait for a batch to fill (default 2 ms)")
    a("--max-queue-images", type=int, help="images waiting per model before 503 (default 1024)")
    a(
        "--target-tpr",
        type=_target_tpr,
        action="append",
        metavar="NAME=TPR",
        help="operating point per model, read off its quantile table (repeatable)",
    )
    a(
        "--reload-interval-s",
        type=float,
        help="rescan the models directory this often for new versions (default 5; 0: only on "
        "SIGHUP or POST /admin/reload)",
    )
    a("--keep-versions", type=int, help="working versions kept loaded per model (default 1)")
    a("--capture-dir", help="capture flagged inputs into this directory (default: off)")
    a("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    a("--access-log", action="store_true", default=None, help="log every request")
    a(
        "--no-page",
        dest="page",
        action="store_false",
        default=None,
        help="no web page at GET / (API only)",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        k: v for k, v in vars(args).items() if v is not None and k != "target_tpr"
    }
    if args.target_tpr:
        overrides["target_tpr"] = {**Settings().target_tpr, **dict(args.target_tpr)}
    return Settings(**overrides)


def _export(settings: Settings) -> None:
    """Put the effective settings into ISOMAX_* so that worker processes build the same ones."""
    for key, value in settings.model_dump(mode="json").items():
        env = f"ISOMAX_{key.upper()}"
        secret = getattr(settings, key)
        if isinstance(secret, SecretStr):
            os.environ[env] = secret.get_secret_value()
        elif value is None:
            os.environ.pop(env, None)
        elif isinstance(value, dict):
            os.environ[env] = json.dumps(value)
        elif isinstance(value, list):
            os.environ[env] = ",".join(value)
        else:
            os.environ[env] = str(value)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        print(f"isomax serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    from service.app import configure_logging, configure_process, create_app

    configure_logging(settings.log_level)
    for name in unknown_env():
        log.warning("ignoring %s: not a setting (see isomax serve --help)", name)
    try:
        refs = discover(settings.models_dir, settings.models)
        check_config(refs, settings)
    except ConfigError as e:
        print(f"isomax serve: {e}", file=sys.stderr)
        return 2
    log.info("serving %s from %s", ", ".join(r.key for r in refs), settings.models_dir)

    import uvicorn

    from service import http_limits, http_protocol, server

    http_limits.configure_from(settings)
    common: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=settings.graceful_timeout_s,
        timeout_keep_alive=settings.keep_alive_s,
        # httptools with head limits and timeouts (service/http_protocol.py says why)
        http=http_protocol.LimitedHttpToolsProtocol,
    )
    if settings.workers == 1:
        configure_process(settings.log_level)
        # uvicorn.run with a shutdown that resets no accepted client, exit 0 on SIGTERM
        return server.run(create_app(settings), **common)
    # Several processes: each loads (and hot-reloads) the models; metrics go through
    # prometheus_client's multiprocess files, in a fresh directory unless PROMETHEUS_MULTIPROC_DIR
    # is given, and model state through the board (service.workers) in ISOMAX_STATE_DIR, also
    # fresh unless given.
    own_state = settings.state_dir is None
    if own_state:
        settings = settings.model_copy(
            update={"state_dir": Path(tempfile.mkdtemp(prefix="isomax-state-"))}
        )
    _export(settings)
    own_dir = multiprocess_dir() is None
    if own_dir:
        os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="isomax-metrics-")
    try:
        uvicorn.run("service.app:app_from_env", factory=True, workers=settings.workers, **common)
    finally:
        if own_dir:
            shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)
        if own_state and settings.state_dir is not None:
            shutil.rmtree(settings.state_dir, ignore_errors=True)
    return 0
