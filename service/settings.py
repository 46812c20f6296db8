"""Service configuration: `ISOMAX_*` environment variables, overridden by `isomax serve` flags.

Bad values are refused when `Settings` is built, i.e. at start-up, never at the first request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from isomax.contract.manifest import NAME_PATTERN, VERSION_PATTERN

MiB = 1024 * 1024
_MODEL_REF = re.compile(NAME_PATTERN[:-1] + r"(:" + VERSION_PATTERN[1:-1] + r")?$")


class Settings(BaseSettings):
    """Every setting can be given as `ISOMAX_<NAME>` (e.g. `ISOMAX_MAX_BATCH_SIZE=64`)."""

    model_config = SettingsConfigDict(env_prefix="ISOMAX_", extra="forbid", frozen=True)

    # Where the bundles are: <models_dir>/<name>/<version>/{model.onnx, manifest.json}.
    models_dir: Path = Path("models")
    # Which models to serve, comma-separated `name` (newest version) or `name:version`;
    # empty serves the newest version of every model found in models_dir.
    models: Annotated[tuple[str, ...], NoDecode] = ()
    # auto: CUDA when onnxruntime offers it, else CPU. cuda: CUDA or not ready (never a silent CPU).
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # onnxruntime threads per model session; 0: by the model's cost (service/sessions.py).
    intra_op_threads: int = Field(default=0, ge=0, le=256)

    # Dynamic batching: a batch runs when it holds max_batch_size images or when its oldest image
    # has waited max_wait_ms, whichever comes first.
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    # Images accepted but not yet answered, per model; beyond it requests get 503 + Retry-After.
    max_queue_images: int = Field(default=1024, ge=1)
    retry_after_s: int = Field(default=1, ge=1, le=3600)
    # ... and the same queue bounded in time (service/batching.py): a request whose expected
    # wait exceeds this gets 503 + Retry-After at once, and one still waiting for its batch
    # this long after it was queued (beyond max_wait_ms) gets it then. 0: no bound in time.
    max_queue_wait_ms: float = Field(default=500.0, ge=0.0, le=600_000.0)

    # Input limits (413 when exceeded).
    max_body_bytes: int = Field(default=32 * MiB, ge=1)
    max_image_bytes: int = Field(default=10 * MiB, ge=1)
    max_image_pixels: int = Field(default=25_000_000, ge=1)  # decompression-bomb guard
    max_images_per_request: int = Field(default=64, ge=1)
    # Decoded size of an image (width x height x bytes per pixel of its mode and bit depth, read
    # from the header before any pixel is decoded) and of all images of one request.
    max_image_decoded_bytes: int = Field(default=40 * MiB, ge=1)
    max_request_decoded_bytes: int = Field(default=128 * MiB, ge=1)
    # Request bodies being received by all connections together; beyond it 503 + Retry-After.
    max_inflight_body_bytes: int = Field(default=256 * MiB, ge=1)
    # Decoded bytes of the images being decoded in worker threads at once; more wait their turn
    # (service/admission.py DecodeBudget): bounds the peak memory of concurrent large images.
    max_inflight_decoded_bytes: int = Field(default=96 * MiB, ge=1)
    # Images with more pixels than this are decoded in a worker thread, not on the event loop.
    inline_decode_max_pixels: int = Field(default=512 * 512, ge=0)

    # Per-model operating point: {"<name>": target_tpr}, read off the manifest's quantile table.
    target_tpr: dict[str, float] = Field(default_factory=dict)
    # Judge each image against the threshold of its predicted class when the manifest has
    # class thresholds (isomax.contract.manifest.ClassCalibration says why); false: one global threshold.
    class_thresholds: bool = True

    # Hot reload (docs/serving.md "Model versions and hot reload"): rescan models_dir every
    # reload_interval_s (0: only on SIGHUP or POST /admin/reload); keep the keep_versions
    # highest working versions of each followed model loaded (the highest answers by default).
    reload_interval_s: float = Field(default=5.0, ge=0.0, le=86400.0)
    keep_versions: int = Field(default=1, ge=1, le=16)
    # POST /admin/reload exists only when this is set (Authorization: Bearer <token>).
    admin_token: SecretStr | None = None
    # Bundles (or their files) that are symbolic links resolving outside models_dir are refused
    # unless this is true.
    allow_symlinks: bool = False
    # With several workers: where each worker publishes its model state so that /readyz and
    # /models answer for all of them (`isomax serve --workers N` makes a fresh one if unset).
    state_dir: Path | None = None

    # Capture of flagged inputs (docs/serving.md "Capture"): off unless capture_dir is set.
    capture_dir: Path | None = None
    capture_ood_share: float = Field(default=1.0, ge=0.0, le=1.0)
    capture_id_share: float = Field(default=0.01, ge=0.0, le=1.0)
    capture_max_bytes: int = Field(default=1024 * MiB, ge=1)
    capture_max_files: int = Field(default=10_000, ge=1)
    capture_queue: int = Field(default=256, ge=1, le=100_000)

    # The web page at GET / (service/static/); false for API-only deployments (then GET / is 404).
    page: bool = True

    # Server (used by `isomax serve`).
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=64)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False
    # On SIGTERM: stop accepting, finish in-flight requests for at most this long, then exit.
    graceful_timeout_s: float = Field(default=30.0, ge=0.0)
    # ... and answer a request that arrives on an idle keep-alive connection for this long
    # (with Connection: close) before closing it.
    shutdown_drain_s: float = Field(default=1.0, ge=0.0, le=60.0)
    # The HTTP connection (service/http_protocol.py): request head size and header lines (431
    # beyond), seconds for a request head to arrive and for a body to resume after a pause (408).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1024 * 1024)
    max_headers: int = Field(default=100, ge=8, le=10_000)
    header_timeout_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    body_timeout_s: float = Field(default=15.0, gt=0.0, le=3600.0)
    keep_alive_s: float = Field(default=5.0, gt=0.0, le=3600.0)
    # Connections one worker holds at most; beyond it the longest-idle one is closed
    # (service/descriptors.py). 0: the nofile limit less 128 descriptors kept for the service's
    # own files, at most 16384.
    max_connections: int = Field(default=0, ge=0, le=1_000_000)
    # Host header allow-list, comma-separated ("api.example.com,localhost"; "*.example.com"
    # matches subdomains): other hosts get 400, which keeps DNS-rebinding pages away from a
    # service on a private address. Empty (the default): any host.
    trusted_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # Origins whose browser pages may call the API (CORS), comma-separated; empty (the
    # default): none, the browser's same-origin rule applies. "*" allows every origin.
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator("models", "trusted_hosts", "cors_origins", mode="before")
    @classmethod
    def _split_lists(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(s.strip() for s in v.split(",") if s.strip())
        return v

    @field_validator("models")
    @classmethod
    def _model_refs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in v if not _MODEL_REF.match(m)]
        if bad:
            raise ValueError(f"models must be 'name' or 'name:version', got {bad}")
        return v

    @field_validator("target_tpr")
    @classmethod
    def _tpr_range(cls, v: dict[str, float]) -> dict[str, float]:
        for name, tpr in v.items():
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"target_tpr key {name!r} is not a model name")
            if not 0.0 < tpr < 1.0:
                raise ValueError(f"target_tpr[{name!r}] = {tpr} must be in (0, 1)")
        return v

    @model_validator(mode="after")
    def _consistent_limits(self) -> Settings:
        if self.max_image_bytes > self.max_body_bytes:
            raise ValueError(
                f"max_image_bytes ({self.max_image_bytes}) exceeds max_body_bytes "
                f"({self.max_body_bytes}): no image could reach the limit"
            )
        if self.max_image_decoded_bytes > self.max_request_decoded_bytes:
            raise ValueError(
                f"max_image_decoded_bytes ({self.max_image_decoded_bytes}) exceeds "
                f"max_request_decoded_bytes ({self.max_request_decoded_bytes})"
            )
        if self.max_body_bytes > self.max_inflight_body_bytes:
            raise ValueError(
                f"max_body_bytes ({self.max_body_bytes}) exceeds max_inflight_body_bytes "
                f"({self.max_inflight_body_bytes}): a full request could never be accepted"
            )
        if self.max_queue_images < self.max_images_per_request:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) is smaller than "
                f"max_images_per_request ({self.max_images_per_request}): a full request "
                "could never be accepted"
            )
        return self

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0


def unknown_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """ISOMAX_* variables that are no setting (typos: pydantic-settings ignores them)."""
    env = os.environ if environ is None else environ
    known = {f"ISOMAX_{name.upper()}" for name in Settings.model_fields}
    return sorted(k for k in env if k.upper().startswith("ISOMAX_") and k.upper() not in known)
