"""The ASGI application (Starlette): health checks, Prometheus metrics, the status page, two actions.

==============================  ==========================================================================
``GET /healthz``                liveness: 200 while the scheduler runs, else 503 (JSON)
``GET /readyz``                 readiness: 200 when listener, database, disk, engines and destinations
                                are fine, else 503; JSON with every check (screener.http.health)
``GET /metrics``                Prometheus text format (screener.metrics)
``GET /``                       status page (``?state=failed`` lists the studies in one state)
``GET /studies/{uid}``          one study: images, states, findings, SR, sending, history
``POST /studies/{uid}/resend``  re-queue a failed study / failed sends (credentials + CSRF token)
``POST /studies/{uid}/complete``  screen a receiving study now (credentials + CSRF token)
``GET /login``                  asks the browser for basic-auth credentials, then back to ``/``
==============================  ==========================================================================

Pages and actions never show patient name, ID or birth date unless ``http.show_patient_data`` is on
and the request is authenticated. Every response carries a strict Content-Security-Policy (no
script at all), ``X-Content-Type-Options``, ``Referrer-Policy`` and ``X-Frame-Options``.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import parse_qs, quote

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from screener import metrics
from screener.http import actions, pages
from screener.http.assets import FAVICON_SVG, STYLE_CSS
from screener.http.auth import REALM, SESSION_COOKIE, Authenticator, Csrf, Principal
from screener.http.status import NodeView, overview, study_detail
from screener.logs import get_logger
from screener.store import is_valid_uid

log = get_logger(__name__)

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
MAX_FORM_BYTES = 4096


class SecurityHeaders:
    """Pure ASGI middleware: the headers above on every response, and no caching of pages."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class StatusApp:
    """Request handlers bound to one node."""

    def __init__(self, view: NodeView, auth: Authenticator, csrf: Csrf | None = None) -> None:
        self.view = view
        self.auth = auth
        self.csrf = csrf or Csrf()
        self.collector = metrics.NodeCollector(view, view.echoer.results, lambda: view.ready())

    # -- helpers ------------------------------------------------------------------------------------

    def principal(self, request: Request) -> Principal | None:
        return self.auth.authenticate(request.headers)

    def _html(self, text: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(text, status_code=status)

    def _session(self, request: Request, principal: Principal | None) -> tuple[str, bool]:
        """The browser's session id (for the CSRF token) and whether it is new."""
        if principal is None:
            return "", False
        sid = request.cookies.get(SESSION_COOKIE, "")
        if len(sid) == 32 and all(c in "0123456789abcdef" for c in sid):
            return sid, False
        return self.csrf.new_session(), True

    @staticmethod
    def _set_session(response: Response, sid: str) -> None:
        response.set_cookie(SESSION_COOKIE, sid, httponly=True, samesite="strict", path="/")

    def _unauthorized(self, principal: Principal | None) -> Response:
        headers = {"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'} if self.auth.basic_enabled else {}
        text = pages.message_page(
            "Sign-in needed", "This action needs the credentials configured in [http].", principal, self.auth.enabled
        )
        return HTMLResponse(text, status_code=401, headers=headers)

    # -- health and metrics -------------------------------------------------------------------------

    def healthz(self, request: Request) -> Response:
        alive = self.view.scheduler_up()
        body = {
            "status": "ok" if alive else "scheduler stopped",
            "version": self.view.version,
            "ae_title": self.view.settings.node.ae_title,
            "uptime_s": round(time.time() - self.view.started_at, 1),
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    def readyz(self, request: Request) -> Response:
        ok, checks = self.view.ready()
        body = {"status": "ready" if ok else "not ready", "checks": {k: c.to_dict() for k, c in checks.items()}}
        return JSONResponse(body, status_code=200 if ok else 503)

    def metrics(self, request: Request) -> Response:
        data = generate_latest(metrics.Exposition(metrics.REGISTRY, self.collector))
        return Response(data, media_type=CONTENT_TYPE_PLAIN_0_0_4)

    # -- pages --------------------------------------------------------------------------------------

    def index(self, request: Request) -> Response:
        principal = self.principal(request)
        state = request.query_params.get("state", "")
        o = overview(self.view, state)
        study_of: dict[str, str] = {}
        for f in o.failures:
            if f.kind == "instance":
                inst = self.view.store.get_instance(f.uid)
                if inst is not None:
                    study_of[f.uid] = inst.study_uid
        return self._html(pages.overview_page(o, principal, self.auth.enabled, study_of))

    def study(self, request: Request) -> Response:
        principal = self.principal(request)
        uid = request.path_params["uid"]
        show_patient = principal is not None and self.view.settings.http.show_patient_data
        d = study_detail(self.view, uid, with_patient=show_patient) if is_valid_uid(uid) else None
        if d is None:
            text = pages.message_page("Not found", "No such study on this node.", principal, self.auth.enabled)
            return self._html(text, 404)
        sid, new = self._session(request, principal)
        token = self.csrf.token(sid, principal) if principal is not None else ""
        done = request.query_params.get("done", "")
        label = f"{self.view.settings.node.ae_title} on {self.view.hostname} · version {self.view.version}"
        response = self._html(pages.study_page(d, principal, self.auth.enabled, token, done, node_label=label))
        if new:
            self._set_session(response, sid)
        return response

    def login(self, request: Request) -> Response:
        principal = self.principal(request)
        if principal is not None:
            return RedirectResponse("/", status_code=303)
        if not self.auth.enabled:
            text = pages.message_page(
                "Read-only", "No credentials are configured in [http]: the page is read-only.", None, False
            )
            return self._html(text, 404)
        if not self.auth.basic_enabled:
            text = pages.message_page(
                "Token only",
                "Only a bearer token is configured: send it as 'Authorization: Bearer <token>' "
                "(configure http.basic_user for a browser).",
                None,
                True,
            )
            return self._html(text, 401)
        return self._unauthorized(None)

    # -- actions ------------------------------------------------------------------------------------

    async def action(self, request: Request) -> Response:
        principal = self.principal(request)
        if not self.auth.enabled:
            text = pages.message_page("Read-only", "Actions need credentials configured in [http].", None, False)
            return self._html(text, 403)
        if principal is None:
            return self._unauthorized(None)
        uid = request.path_params["uid"]
        what = request.path_params["action"]
        if what not in ("resend", "complete"):
            return JSONResponse({"error": "not found"}, status_code=404)
        if principal.method == "basic":  # a browser: credentials are sent automatically, so check CSRF
            body = await request.body()
            form = parse_qs(body[:MAX_FORM_BYTES].decode("utf-8", "replace")) if len(body) <= MAX_FORM_BYTES else {}
            token = (form.get("csrf") or [""])[0]
            if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none") or not (
                self.csrf.valid(request.cookies.get(SESSION_COOKIE), principal, token)
            ):
                log.warning("http_csrf_refused", action=what)
                text = pages.message_page(
                    "Refused",
                    "The form is stale or came from another site: reload the page and retry.",
                    principal,
                    True,
                )
                return self._html(text, 403)
        if not is_valid_uid(uid) or self.view.store.get_study(uid) is None:
            text = pages.message_page("Not found", "No such study on this node.", principal, True)
            return self._html(text, 404)
        if what == "resend":
            n = await run_in_threadpool(actions.resend_study, self.view.store, uid)
            done = "resend" if n else "resend-none"
        else:
            changed = await run_in_threadpool(self.view.store.force_complete, uid)
            n = int(changed)
            done = "complete" if changed else "complete-none"
        log.info("http_action", action=what, study_uid=uid, user=principal.name, changed=n)
        if principal.method == "bearer":
            return JSONResponse({"study_uid": uid, "action": what, "changed": n})
        return RedirectResponse(f"/studies/{quote(uid)}?done={done}", status_code=303)

    # -- static -------------------------------------------------------------------------------------

    @staticmethod
    def style(request: Request) -> Response:
        return Response(STYLE_CSS, media_type="text/css", headers={"Cache-Control": "max-age=3600"})

    @staticmethod
    def favicon(request: Request) -> Response:
        return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": "not found"}, status_code=404)


def create_app(view: NodeView, auth: Authenticator | None = None, csrf: Csrf | None = None) -> Any:
    """The ASGI app for one node (auth defaults to none configured: read-only)."""
    s = StatusApp(view, auth or Authenticator(), csrf)
    routes = [
        Route("/healthz", s.healthz, methods=["GET"]),
        Route("/readyz", s.readyz, methods=["GET"]),
        Route("/metrics", s.metrics, methods=["GET"]),
        Route("/", s.index, methods=["GET"]),
        Route("/studies/{uid}", s.study, methods=["GET"]),
        Route("/studies/{uid}/{action:str}", s.action, methods=["POST"]),
        Route("/login", s.login, methods=["GET"]),
        Route("/static/style.css", s.style, methods=["GET"]),
        Route("/static/favicon.svg", s.favicon, methods=["GET"]),
        Route("/favicon.ico", s.favicon, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: _not_found})
    app.state.status = s
    return SecurityHeaders(app)
