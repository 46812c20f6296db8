"""The FastAPI routes, one module per group: health and readiness, models, admin.

POST /classify (service/classify.py), v2 (service/v2/routes.py) and the page (service/page.py)
are the other route modules; `service.app.create_app` assembles them.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.routing import APIRoute


def summarized(router: APIRouter) -> APIRouter:
    """`router`, each route's one-line docstring made its OpenAPI summary (FastAPI would use
    the function's name)."""
    for route in router.routes:
        if isinstance(route, APIRoute):
            route.summary = route.summary or (route.description or "").split("\n")[0] or None
    return router
