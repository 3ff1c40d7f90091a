"""The browser side: the dashboard at ``/`` and the interactive API docs, all served offline.

FastAPI's default ``/docs`` and ``/redoc`` load their scripts from a public CDN, so they are blank
on an air-gapped cluster. Here the Swagger UI and ReDoc assets come from the installed
``fastapi-offline`` package (only its static files are used) and the dashboard from ``app/ui/``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
DOCS_ASSETS = "/_docs-assets"
DASHBOARD_ASSETS = "/ui"


def _docs_static_dir() -> Path:
    """The folder of Swagger UI / ReDoc files shipped by ``fastapi-offline``."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def install(app: FastAPI, api_prefix: str) -> None:
    """Serve the offline docs (``/docs``, ``/redoc``) and the dashboard (``/``) on ``app``, and
    the read-only JSON views the dashboard draws (under ``api_prefix``).

    The app must be built with ``docs_url=None, redoc_url=None`` so these routes replace the CDN ones.
    """
    from app.routers import insights

    app.include_router(insights.router, prefix=api_prefix)
    app.mount(DOCS_ASSETS, StaticFiles(directory=_docs_static_dir()), name="docs-assets")
    app.mount(DASHBOARD_ASSETS, StaticFiles(directory=UI_DIR), name="dashboard")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - API docs",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            oauth2_redirect_url=oauth_redirect,
        )

    @app.get(oauth_redirect, include_in_schema=False)
    def swagger_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - API reference",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,  # fonts from Google would leave the machine
        )

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        # no-cache: after an upgrade the browser must pick up the new page, not a stale one
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})
