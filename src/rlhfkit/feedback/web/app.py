"""FastAPI app for people: login, the annotator queue (pairwise and ranking pages with keyboard shortcuts) and
admin pages (progress, agreement, gold accuracy, flagged items, export). All reads and writes go through
`FeedbackService`.

Security, by default: scrypt password hashes (service.py); a signed session cookie, HttpOnly and
SameSite=Strict; a CSRF token bound to the session on every POST (login included, bound to a pre-login
cookie); role checks on every endpoint; every prompt and response rendered as escaped text (Jinja autoescape,
no |safe anywhere); a strict Content-Security-Policy with no inline script or style; a signing key generated on
first run with owner-only permissions; a per-user (per-address before login) rate limit; localhost binding."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
import uuid
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from rlhfkit.data.preference import STRENGTHS
from rlhfkit.errors import UserError
from rlhfkit.feedback.export import export_rows
from rlhfkit.feedback.service import FeedbackError, FeedbackService, Forbidden, UserInfo
from rlhfkit.feedback.store import FLAGS, database_url, open_store

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "rlhfkit_session"
LOGIN_COOKIE = "rlhfkit_login"
SESSION_SECONDS = 12 * 3600
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
STRENGTH_KEYS = {"z": "negligible", "x": "slightly_better", "c": "better", "v": "significantly_better"}


# ----------------------------------------------------------------------------------------------- secret key
def default_secret_file(db: str) -> Path:
    url = database_url(db)
    if url.startswith("sqlite:///") and not url.endswith(":memory:"):
        return Path(url[len("sqlite:///"):]).parent / "secret_key"
    return Path.home() / ".config" / "rlhfkit" / "secret_key"


def load_or_create_secret(path: str | Path) -> bytes:
    """The session-signing key at path, created (32 random bytes, mode 0600) if missing. A key file that others
    can read is refused: whoever reads it can forge any session."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = p.stat().st_mode & 0o777
        if mode & 0o077:
            raise UserError(f"the secret key file {p} is readable by other users (mode {oct(mode)}); run chmod 600 "
                            f"{p} or delete it to make a new one.") from None
        key = bytes.fromhex(p.read_text().strip())
        if len(key) < 32:
            raise UserError(f"the secret key file {p} holds fewer than 32 bytes; delete it to make a new one.")
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    return key


# ------------------------------------------------------------------------------------------------ signing
class Signer:
    def __init__(self, key: bytes):
        self.key = key

    def sign(self, purpose: str, value: str) -> str:
        mac = hmac.new(self.key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def session_cookie(self, user_id: int) -> str:
        body = f"{user_id}.{int(time.time()) + SESSION_SECONDS}.{secrets.token_urlsafe(16)}"
        return f"{body}.{self.sign('session', body)}"

    def read_session(self, cookie: str | None) -> tuple[int, str] | None:
        """(user id, session nonce) of a valid, unexpired cookie."""
        if not cookie or cookie.count(".") != 3:
            return None
        body, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self.sign("session", body)):
            return None
        user_id, expires, nonce = body.split(".")
        if not user_id.isdigit() or not expires.isdigit() or int(expires) < time.time():
            return None
        return int(user_id), nonce


class RateLimiter:
    """At most `per_minute` requests per key in any 60-second window."""

    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.hits: dict[str, deque] = defaultdict(deque)
        self.lock = threading.Lock()

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self.lock:
            q = self.hits[key]
            while q and q[0] <= now - 60:
                q.popleft()
            if len(q) >= self.per_minute:
                return False
            q.append(now)
            return True


class HTTPRefusal(Exception):
    def __init__(self, status: int, message: str, redirect: str | None = None):
        self.status, self.message, self.redirect = status, message, redirect


# ---------------------------------------------------------------------------------------------------- app
def create_app(service: FeedbackService, secret: bytes, rate_limit: int = 120, secure_cookies: bool = False
               ) -> FastAPI:
    """The web app over a service. secure_cookies marks cookies Secure (set it when served over HTTPS)."""
    app = FastAPI(title="rlhfkit labelling", docs_url=None, redoc_url=None, openapi_url=None)
    signer = Signer(secret)
    limiter = RateLimiter(rate_limit)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"],
                      default=True))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(request=request, **ctx), status_code=status)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):  # noqa: ANN001
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(HTTPRefusal)
    async def refused(request: Request, exc: HTTPRefusal):  # noqa: ANN001
        if exc.redirect:
            return RedirectResponse(exc.redirect, status_code=303)
        return render(request, "error.html", exc.status, message=exc.message, user=None)

    @app.exception_handler(FeedbackError)
    async def service_refused(request: Request, exc: FeedbackError):  # noqa: ANN001
        return render(request, "error.html", exc.status, message=str(exc), user=None)

    def client_key(request: Request) -> str:
        return f"ip:{request.client.host if request.client else '?'}"

    def session(request: Request) -> tuple[UserInfo, str]:
        found = signer.read_session(request.cookies.get(SESSION_COOKIE))
        user = service.user(found[0]) if found else None
        if user is None:
            if request.method == "GET":
                raise HTTPRefusal(303, "", redirect="/login")
            raise HTTPRefusal(403, "You are not logged in (or your session expired); log in again.")
        if not limiter.allow(f"user:{user.id}"):
            raise HTTPRefusal(429, "Too many requests; wait a minute and try again.")
        return user, found[1]

    def csrf_token(nonce: str) -> str:
        return signer.sign("csrf", nonce)

    def check_csrf(nonce: str, token: str) -> None:
        if not token or not hmac.compare_digest(token, csrf_token(nonce)):
            raise HTTPRefusal(403, "The form's security token is missing or wrong; reload the page and try again.")

    def annotator(s: tuple[UserInfo, str] = Depends(session)) -> tuple[UserInfo, str]:
        return s  # admins may label too

    def admin(s: tuple[UserInfo, str] = Depends(session)) -> tuple[UserInfo, str]:
        if s[0].role != "admin":
            raise HTTPRefusal(403, "This page is for admins.")
        return s

    # ------------------------------------------------------------------------------------------ login
    @app.get("/login")
    def login_page(request: Request) -> HTMLResponse:
        if not limiter.allow(client_key(request)):
            raise HTTPRefusal(429, "Too many requests; wait a minute and try again.")
        nonce = secrets.token_urlsafe(16)
        response = render(request, "login.html", csrf=signer.sign("login", nonce), error=None, user=None)
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict", secure=secure_cookies,
                            max_age=3600)
        return response

    @app.post("/login")
    def login(request: Request, name: str = Form(""), password: str = Form(""), csrf: str = Form("")):
        if not limiter.allow(client_key(request)):
            raise HTTPRefusal(429, "Too many login attempts; wait a minute and try again.")
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not hmac.compare_digest(csrf, signer.sign("login", nonce)):
            raise HTTPRefusal(403, "The login form's security token is missing or wrong; reload the page.")
        user = service.authenticate(name, password)
        if user is None:
            return render(request, "login.html", 401, csrf=csrf, error="Wrong name or password.", user=None)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, signer.session_cookie(user.id), httponly=True, samesite="strict",
                            secure=secure_cookies, max_age=SESSION_SECONDS)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    def logout(csrf: str = Form(""), s: tuple[UserInfo, str] = Depends(session)):
        check_csrf(s[1], csrf)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # ------------------------------------------------------------------------------------------ annotators
    @app.get("/")
    def home(request: Request, s: tuple[UserInfo, str] = Depends(annotator)) -> HTMLResponse:
        user, nonce = s
        rows = [(p, *service.user_progress(user.id, p.id)) for p in service.projects()]
        return render(request, "projects.html", user=user, csrf=csrf_token(nonce), rows=rows)

    @app.get("/p/{project_id}")
    def next_task(request: Request, project_id: int, s: tuple[UserInfo, str] = Depends(annotator)) -> HTMLResponse:
        user, nonce = s
        project = service.project(project_id)
        done, left = service.user_progress(user.id, project_id)
        task = service.next_task(user.id, project_id)
        ctx = dict(user=user, csrf=csrf_token(nonce), project=project, done=done, left=left, flags=FLAGS)
        if task is None:
            return render(request, "done.html", **ctx)
        ctx.update(task=task, submission_id=uuid.uuid4().hex, strengths=STRENGTH_KEYS, shown=task.shown)
        return render(request, "pairwise.html" if project.mode == "pairwise" else "ranking.html", **ctx)

    @app.post("/p/{project_id}/submit")
    def submit(project_id: int, csrf: str = Form(""), assignment_id: int = Form(...),
               submission_id: str = Form(...), outcome: str | None = Form(None), strength: str | None = Form(None),
               flags: list[str] = Form([]), rationale: str = Form(""), time_spent_ms: int | None = Form(None),
               rank_item: list[int] = Form([]), rank_value: list[str] = Form([]),
               s: tuple[UserInfo, str] = Depends(annotator)):
        user, nonce = s
        check_csrf(nonce, csrf)
        task = service.task(user.id, assignment_id)  # Forbidden for another annotator's task
        if task.project.id != project_id:
            raise Forbidden("this task belongs to another project.")
        ranking = None
        if task.project.mode == "ranking" and outcome != "skip":
            ranking = _tiers(rank_item, rank_value, len(task.responses))
            outcome = None
        service.submit(user.id, assignment_id, submission_id, outcome=outcome or None,
                       strength=strength or None, ranking=ranking, flags=flags, rationale=rationale,
                       time_spent_ms=time_spent_ms)
        return RedirectResponse(f"/p/{project_id}", status_code=303)

    # ----------------------------------------------------------------------------------------------- admin
    @app.get("/admin")
    def admin_home(request: Request, s: tuple[UserInfo, str] = Depends(admin)) -> HTMLResponse:
        rows = [(p, service.progress(p.id)) for p in service.projects()]
        return render(request, "admin.html", user=s[0], csrf=csrf_token(s[1]), rows=rows)

    @app.get("/admin/p/{project_id}")
    def admin_project(request: Request, project_id: int, s: tuple[UserInfo, str] = Depends(admin)) -> HTMLResponse:
        project = service.project(project_id)
        return render(request, "admin_project.html", user=s[0], csrf=csrf_token(s[1]), project=project,
                      progress=service.progress(project_id), agreement=service.agreement(project_id),
                      flagged=service.flagged(project_id))

    @app.get("/admin/p/{project_id}/export")
    def admin_export(project_id: int, format: str = "pairs", s: tuple[UserInfo, str] = Depends(admin)) -> Response:
        if format not in ("pairs", "ranking", "kto"):
            raise HTTPRefusal(422, "format must be pairs, ranking or kto.")
        import json

        project = service.project(project_id)
        rows, _ = export_rows(service, project_id, kto=format == "kto",
                              rankings_as="ranking" if format == "ranking" else "pairs")
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(body, media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="{project.name}-{format}.jsonl"'})

    return app


def _tiers(items: list[int], values: list[str], k: int) -> list[list[int]]:
    """rank_item[i] got rank rank_value[i] (1 = best; equal ranks are ties) -> tiers best first."""
    if len(items) != len(values) or sorted(items) != list(range(k)):
        raise FeedbackError("the ranking form is incomplete; reload the page.")
    by_rank: dict[int, list[int]] = defaultdict(list)
    for item, value in zip(items, values):
        if not value.strip().isdigit():
            raise FeedbackError("give every response a rank (1 = best) before submitting.")
        by_rank[int(value)].append(item)
    return [sorted(by_rank[r]) for r in sorted(by_rank)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_server(db: str, host: str = "127.0.0.1", port: int = 8000, secret_file: str = "",
               rate_limit: int = 120, secure_cookies: bool = False) -> None:
    import uvicorn

    store = open_store(db)
    key = load_or_create_secret(secret_file or default_secret_file(db))
    app = create_app(FeedbackService(store), key, rate_limit=rate_limit, secure_cookies=secure_cookies)
    if not _is_loopback(host):
        log.warning("serving on %s: other machines can reach this app; put it behind HTTPS", host)
    log.info("labelling app on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
