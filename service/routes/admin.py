"""POST /admin/reload: rescan the models directory now; exists only with ISOMAX_ADMIN_TOKEN."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.auth import TokenGuard
from service.schemas import ErrorResponse, ModelState, ReadyResponse
from service.state import StateDep

# How long POST /admin/reload waits for the rescan it asked for (loads included).
RELOAD_WAIT_S = 120.0


def router(guard: TokenGuard) -> APIRouter:
    """The admin route, its token checked by `guard` (bounded and logged wrong guesses)."""
    admin = APIRouter()

    @admin.post(
        "/admin/reload",
        response_model=ReadyResponse,
        responses={401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}},
    )
    async def admin_reload(request: Request, state: StateDep) -> Response:
        """Rescan the models directory now (every worker); answers this worker's state.

        Exists only when ISOMAX_ADMIN_TOKEN is set; needs `Authorization: Bearer <token>`.
        """
        peer = f"{request.client.host}" if request.client else "client"
        refused = guard.check(request.headers.get("authorization", ""), peer)
        if refused is not None:  # wrong guesses are bounded and logged (service/auth.py)
            status, detail = refused
            headers = {401: {"WWW-Authenticate": "Bearer"}}.get(status, {})
            if status == 429:
                headers = {"Retry-After": str(max(1, round(guard.locked_for())))}
            return JSONResponse({"detail": detail}, status, headers=headers)
        registry = state.registry
        state.board.touch_reload()
        n = registry.request_reload()
        done = await asyncio.get_running_loop().run_in_executor(
            None, registry.wait_reload, n, RELOAD_WAIT_S
        )
        models = {k: ModelState(**asdict(e)) for k, e in registry.entries.items()}
        body = ReadyResponse(
            ready=registry.ready,
            detail=None if done else f"the rescan did not finish within {RELOAD_WAIT_S} s",
            models=models,
        )
        return JSONResponse(body.model_dump(), 200 if done else 202)

    return admin
