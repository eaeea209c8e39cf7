"""The dashboard's HTML shell and static files, and the Swagger UI at ``/docs``. They hold
no data, so they need no API key: the pages' scripts ask ``/v1`` for everything, with the
key the user entered.

Third-party code is served from ``static/`` (no CDN, so the strict CSP holds and the pages
work offline): uPlot 1.6.32 (``uPlot.iife.min.js``, ``uPlot.min.css``, MIT:
``uPlot.LICENSE``) for the charts and swagger-ui-dist 5.36.0 (``swagger-ui-bundle.js``,
``swagger-ui.css``, Apache-2.0: ``swagger-ui.LICENSE``, ``swagger-ui.NOTICE``), both
copied unchanged from their npm packages.
"""

from __future__ import annotations

from pathlib import Path

import jinja2
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from vllm_batch import __version__

HERE = Path(__file__).parent
DASHBOARD = "/dashboard"
STATIC = f"{DASHBOARD}/static"
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, auto_reload=False
)
# Scripts, styles and fetches only from this origin: no inline code, no CDN.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def prefers_html(accept: str) -> bool:
    """Whether an ``Accept`` header ranks ``text/html`` above JSON (what browsers send).

    Only an explicit ``text/html`` (or ``text/*``) counts, and a tie goes to JSON, so
    ``*/*`` (curl, SDKs) and ``application/json, text/html`` keep getting JSON.
    """
    html = json = 0.0
    for part in accept.split(","):
        media, *params = (item.strip() for item in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = max(0.0, min(1.0, float(value)))
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if media in ("text/html", "text/*"):
            html = max(html, quality)
        elif media in ("application/json", "application/*", "*/*"):
            json = max(json, quality)
    return html > json


def render(request: Request, view: str, title: str, batch_id: str = "") -> HTMLResponse:
    template = TEMPLATES.get_template("dashboard.html")
    docs = bool(request.app.openapi_url)
    html = template.render(
        view=view, title=title, batch_id=batch_id, version=__version__, static=STATIC, docs=docs
    )
    return HTMLResponse(html, headers=SECURITY_HEADERS)


@router.get(DASHBOARD)
async def dashboard(request: Request) -> HTMLResponse:
    return render(request, "overview", "Dashboard")


@router.get(f"{DASHBOARD}/")
async def dashboard_slash() -> RedirectResponse:
    return RedirectResponse(DASHBOARD, status_code=308)


@router.get(DASHBOARD + "/batches/{batch_id}")
async def batch_page(request: Request, batch_id: str) -> HTMLResponse:
    return render(request, "batch", f"Batch {batch_id[:64]}", batch_id[:64])


async def api_docs(request: Request) -> HTMLResponse:
    """Swagger UI for ``/openapi.json``, from the vendored copy under the dashboard's CSP."""
    html = TEMPLATES.get_template("docs.html").render(
        title=request.app.title,
        version=__version__,
        static=STATIC,
        openapi_url=request.app.openapi_url,
    )
    return HTMLResponse(html, headers=SECURITY_HEADERS)


def install_pages(app: FastAPI, *, docs: bool = False) -> None:
    """Serve the dashboard shell and its static files on ``app`` (and ``/docs`` if ``docs``)."""
    app.include_router(router)
    if docs:
        app.add_api_route("/docs", api_docs, methods=["GET"], include_in_schema=False)
    app.mount(STATIC, StaticFiles(directory=HERE / "static"), name="dashboard-static")
