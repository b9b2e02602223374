"""The investigators' timeline page (`GET /ui`): server-rendered, no JavaScript at all.

It is a client of the same reads as the API (`query_service.list_events`,
`get_event`), so every search and every event opened is audited exactly like
an API call, and a bad field is answered with the same message naming it.

The page is behind the same bearer tokens. A browser cannot be made to send an
`Authorization` header by a plain page, so the token is pasted once into a
form and kept in a cookie (HttpOnly, SameSite=Strict, Path=/ui, Secure over
HTTPS). That suits a developer's machine; a deployment puts an OIDC proxy in
front of `/ui` (oauth2-proxy with Keycloak), which signs the investigator in
and passes the access token on as `Authorization: Bearer`, which this page
reads first. The JSON API never reads the cookie, so a page on another site
cannot use it to call the API on an investigator's behalf.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from . import query as reads
from . import query_service as svc
from .auth import AuthError, Principal, bearer_token
from .contract import Outcome

COOKIE = "audit_token"
MAX_FORM_BYTES = 32 * 1024

TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("openg2p_audit", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)

# No script may run, no other origin may frame the page or receive its forms.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def _render(template: str, status: int = 200, **context: Any) -> Response:
    context.setdefault("principal", None)
    context.setdefault("error", None)
    html = TEMPLATES.get_template(template).render(**context)
    return Response(html, status, HEADERS, media_type="text/html")


def _secure(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"


def _token(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization")) or request.cookies.get(COOKIE)


def _form_defaults() -> dict[str, str]:
    now = datetime.now(UTC).replace(microsecond=0)
    return {
        "from": (now - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "to": (now + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "limit": "50",
    }


async def _form(request: Request) -> bytes | None:
    """The sign-in form's body, or None once it is over MAX_FORM_BYTES.

    Nobody is signed in yet, so nothing larger is read: a declared length over the
    bound is refused before a byte of the body is, and a body sent without one (or
    longer than it said) is read only up to the bound.
    """
    declared = request.headers.get("content-length", "")
    if re.fullmatch(r"[0-9]+", declared) and int(declared) > MAX_FORM_BYTES:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    return bytes(body)


async def _sign_in(request: Request) -> Response:
    body = await _form(request)
    if body is None:
        # The rest of the body is never read: the connection is closed after the answer.
        response = _render("login.html", 413, error="The form is too large.")
        response.headers["Connection"] = "close"
        return response
    token = dict(parse_qsl(body.decode("utf-8", "replace"))).get("token", "").strip()
    try:
        await svc.authorize(request, svc.READ_ROLE, token=token or None)
    except AuthError as exc:
        return _refused(exc)
    response = RedirectResponse("/ui", 303, headers=HEADERS)
    response.set_cookie(
        COOKIE, token, max_age=8 * 3600, path="/ui", secure=_secure(request),
        httponly=True, samesite="strict",
    )  # fmt: skip
    return response


def _refused(exc: AuthError) -> Response:
    if exc.status == 403:
        message = "This token does not grant the role audit.read."
    elif exc.status == 503:
        message = "Tokens cannot be checked right now; try again shortly."
    else:
        message = "Sign in with a valid token."
    response = _render("login.html", exc.status, error=message)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="openg2p-audit"'
    return response


def _links(form: dict[str, str]):
    base = {k: v for k, v in form.items() if k in ("from", "to", "limit")}

    def link(**params: str) -> str:
        return "/ui?" + urlencode({**base, **params})

    return link


def _timeline_title(form: dict[str, str]) -> str | None:
    if form.get("resource_id"):
        return f"Timeline of {form.get('resource_type')}/{form['resource_id']}"
    if form.get("actor_id"):
        return f"Timeline of actor {form['actor_id']}"
    if form.get("trace_id"):
        return f"Trace {form['trace_id']}"
    return None


async def _timeline(request: Request, principal: Principal) -> Response:
    items = [(k, v) for k, v in request.query_params.multi_items() if v != ""]
    form = dict(items)
    common = {"principal": principal, "outcomes": [o.value for o in Outcome]}
    if not items:
        return _render("timeline.html", form=_form_defaults(), events=None, link=_links({}),
                       timeline=None, next_page=None, first_page=None, **common)  # fmt: skip
    try:
        page = await svc.list_events(principal, items, request)
    except reads.BadParameter as exc:
        return _render("timeline.html", 400, form=form, events=None, link=_links(form),
                       timeline=None, next_page=None, first_page=None,
                       error=f"{exc.parameter}: {exc.message}", **common)  # fmt: skip
    except svc.ReadFailed as exc:
        return _render("timeline.html", 503, form=form, events=None, link=_links(form),
                       timeline=None, next_page=None, first_page=None,
                       error=f"Not answered: {exc}", **common)  # fmt: skip
    without_cursor = {k: v for k, v in form.items() if k != "cursor"}
    next_page = (
        "/ui?" + urlencode({**without_cursor, "cursor": page["next_cursor"]})
        if page["next_cursor"]
        else None
    )
    first_page = "/ui?" + urlencode(without_cursor) if "cursor" in form else None
    return _render("timeline.html", form=form, events=page["events"], link=_links(form),
                   timeline=_timeline_title(form), next_page=next_page,
                   first_page=first_page, **common)  # fmt: skip


def _pretty(details: Any) -> str:
    if details is None:
        return "(none)"
    return json.dumps(details, indent=2, ensure_ascii=False, sort_keys=True)


async def _event(request: Request, principal: Principal, event_id: str) -> Response:
    try:
        events = await svc.get_event(principal, event_id, request)
    except reads.BadParameter as exc:
        return _render("event.html", 400, principal=principal, events=[], event_id=event_id,
                       columns=reads.EVENT_COLUMNS, pretty=_pretty, back="/ui",
                       error=f"{exc.parameter}: {exc.message}")  # fmt: skip
    except svc.ReadFailed as exc:
        return _render("event.html", 503, principal=principal, events=[], event_id=event_id,
                       columns=reads.EVENT_COLUMNS, pretty=_pretty, back="/ui",
                       error=f"Not answered: {exc}")  # fmt: skip
    return _render("event.html", 200 if events else 404, principal=principal, events=events,
                   event_id=event_id, columns=reads.EVENT_COLUMNS, pretty=_pretty,
                   back="/ui")  # fmt: skip


async def handle(request: Request, path: str) -> Response:
    """Every `/ui` path; the API's auth, reads and audit events underneath."""
    if path == "/ui/token":
        if request.method != "POST":
            return Response(status_code=405, headers={"Allow": "POST"})
        return await _sign_in(request)
    if path == "/ui/logout":
        response = RedirectResponse("/ui", 303, headers=HEADERS)
        response.delete_cookie(COOKIE, path="/ui", secure=_secure(request), httponly=True,
                               samesite="strict")  # fmt: skip
        return response
    if request.method not in ("GET", "HEAD"):
        return Response(status_code=405, headers={"Allow": "GET"})
    try:
        principal = await svc.authorize(request, svc.READ_ROLE, token=_token(request))
    except AuthError as exc:
        return _refused(exc)
    if path == "/ui":
        return await _timeline(request, principal)
    if path.startswith("/ui/events/") and len(path) > len("/ui/events/"):
        return await _event(request, principal, path.removeprefix("/ui/events/"))
    return _render("login.html", 404, principal=principal, error="No such page.")
