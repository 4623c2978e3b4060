"""FastAPI app for people: login, the annotator queue (pairwise, ranking, per-criterion rubric and per-attribute
score pages, all with keyboard shortcuts), a password page, and admin pages (progress, agreement, gold accuracy,
annotator reliability, flagged items, export, users; round projects grouped under their run). All reads and
writes go through `FeedbackService`.

Security, by default: scrypt password hashes and a per-name login lockout with back-off (service.py); server-side
sessions (a random token in an HttpOnly, SameSite=Strict cookie, only its hash in the database) that logout, an
admin, a deactivation or a password change ends at once; a CSRF token bound to the session on every POST (login
included, bound to a pre-login cookie); role checks on every endpoint; every prompt and response rendered as
escaped text (Jinja autoescape, no |safe anywhere); a strict Content-Security-Policy with no inline script or style
and the same security headers on every response, error pages included; 400 (never 500) for malformed fields; a
request-body limit (413); a signing key generated on first run with owner-only permissions; a per-user
(per-address before login) rate limit, with client addresses from X-Forwarded-For believed only from proxies the
operator names; localhost binding."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Sequence

from fastapi import Depends, FastAPI, Form, Path as PathParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlhfkit.errors import UserError
from rlhfkit.feedback.export import attribute_rows, export_by_criterion, export_rows, reliability_reports
from rlhfkit.feedback.service import (
    MAX_ID, AccountLocked, FeedbackError, FeedbackService, Forbidden, NotFound, Task, UserInfo, Verdict,
)
from rlhfkit.feedback.store import FLAGS, LIKERT, database_url, open_store

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "rlhfkit_session"
LOGIN_COOKIE = "rlhfkit_login"
SESSION_SECONDS = 12 * 3600
MAX_BODY_BYTES = 1024 * 1024
"""The largest request body accepted (413 above it): a labelling form with a full rationale is under 64 KiB."""
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
STRENGTH_KEYS = {"z": "negligible", "x": "slightly_better", "c": "better", "v": "significantly_better"}
TEMPLATES = {"pairwise": "pairwise.html", "rubric": "rubric.html", "ranking": "ranking.html",
             "attributes": "attributes.html"}
"""The task page of each kind of project (a rubric project is a pairwise one with criteria)."""

Id = Annotated[int, PathParam(ge=1, le=MAX_ID)]
"""A row id in a path: a SQLite INTEGER, so anything past 2**63 - 1 is a 400, not an overflow deep in the driver."""


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
        try:
            key = bytes.fromhex(p.read_text(encoding="ascii").strip())
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"the secret key file {p} does not hold a hex key (what rlhfkit writes there); delete it "
                            "to make a new one (sessions signed with the old key end).") from None
        if len(key) < 32:
            raise UserError(f"the secret key file {p} holds fewer than 32 bytes; delete it to make a new one.")
        return key
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex())
    return key


# ------------------------------------------------------------------------------------------- plumbing
class Signer:
    def __init__(self, key: bytes):
        self.key = key

    def sign(self, purpose: str, value: str) -> str:
        mac = hmac.new(self.key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def _same(given: str, expected: str) -> bool:
    # compare bytes: hmac.compare_digest refuses str with non-ASCII characters (a TypeError, so a 500)
    return hmac.compare_digest(given.encode(), expected.encode())


class RateLimiter:
    """At most `per_minute` requests per key in any 60-second window: the moving-window limiter of the `limits`
    library (the one behind Flask-Limiter and slowapi), kept in memory. Its storage expires idle keys itself."""

    def __init__(self, per_minute: int):
        from limits import RateLimitItemPerMinute, storage, strategies

        self.item = RateLimitItemPerMinute(per_minute)
        self.limiter = strategies.MovingWindowRateLimiter(storage.MemoryStorage())

    def allow(self, key: str) -> bool:
        return self.limiter.hit(self.item, key)


class HTTPRefusal(Exception):
    def __init__(self, status: int, message: str, redirect: str | None = None):
        self.status, self.message, self.redirect = status, message, redirect


class SecurityHeaders:
    """ASGI middleware that puts SECURITY_HEADERS on every response start, whoever sends it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


class LabellingApp(FastAPI):
    """FastAPI with SecurityHeaders outside everything. Middleware added the usual way sits inside Starlette's
    ServerErrorMiddleware (which answers unhandled exceptions) and FastAPI's body-size limit (which answers 413
    itself), so their responses would go out without the headers."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack())


# ---------------------------------------------------------------------------------------------------- app
def create_app(service: FeedbackService, secret: bytes, rate_limit: int = 120, secure_cookies: bool = False,
               max_body_bytes: int = MAX_BODY_BYTES, session_seconds: int = SESSION_SECONDS) -> FastAPI:
    """The web app over a service. secure_cookies marks cookies Secure (set it when served over HTTPS);
    max_body_bytes bounds every request body; a login lasts session_seconds unless ended sooner."""
    app = LabellingApp(title="rlhfkit labelling", docs_url=None, redoc_url=None, openapi_url=None,
                       max_body_size=max_body_bytes)
    signer = Signer(secret)
    limiter = RateLimiter(rate_limit)
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"],
                      default=True))
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def render(request: Request, name: str, status: int = 200, headers: dict | None = None, **ctx: Any
               ) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(request=request, **ctx), status_code=status,
                            headers=headers)

    def error_page(request: Request, status: int, message: str, headers: dict | None = None) -> HTMLResponse:
        return render(request, "error.html", status, headers=headers, message=message, user=None)

    @app.exception_handler(HTTPRefusal)
    async def refused(request: Request, exc: HTTPRefusal):  # noqa: ANN001
        if exc.redirect:
            return RedirectResponse(exc.redirect, status_code=303)
        return error_page(request, exc.status, exc.message)

    @app.exception_handler(FeedbackError)
    async def service_refused(request: Request, exc: FeedbackError):  # noqa: ANN001
        return error_page(request, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError):  # noqa: ANN001
        # 400, not FastAPI's 422: the request itself is malformed (a field missing, not a number, out of range);
        # the values are not echoed back
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
                             for e in exc.errors()[:5])
        return error_page(request, 400, f"The request is malformed ({problems}); reload the page and try again.")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # noqa: ANN001
        # unknown paths, wrong methods, unparseable bodies, bodies over the limit: Starlette's plain answers,
        # as pages
        return error_page(request, exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):  # noqa: ANN001
        # Starlette logs the exception after this page goes out; the page tells nothing about it
        return error_page(request, 500, "Something went wrong on the server; the error was logged. Try again, or "
                                        "tell an admin if it keeps happening.")

    def client_key(request: Request) -> str:
        return f"ip:{request.client.host if request.client else '?'}"

    def limit(key: str, message: str = "Too many requests; wait a minute and try again.") -> None:
        if not limiter.allow(key):
            raise HTTPRefusal(429, message)

    def session(request: Request) -> tuple[UserInfo, str]:
        """(user, session id) of the request's working session."""
        found = service.session_user(request.cookies.get(SESSION_COOKIE))
        if found is None:
            if request.method == "GET":
                raise HTTPRefusal(303, "", redirect="/login")
            raise HTTPRefusal(403, "You are not logged in (or your session ended); log in again.")
        limit(f"user:{found[0].id}")
        return found

    def csrf_token(session_id: str) -> str:
        return signer.sign("csrf", session_id)

    def check_csrf(session_id: str, token: str) -> None:
        if not token or not _same(token, csrf_token(session_id)):
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
        limit(client_key(request))
        nonce = secrets.token_urlsafe(16)
        response = render(request, "login.html", csrf=signer.sign("login", nonce), error=None, user=None)
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict", secure=secure_cookies,
                            max_age=3600)
        return response

    @app.post("/login")
    def login(request: Request, name: str = Form(""), password: str = Form(""), csrf: str = Form("")):
        limit(client_key(request), "Too many login attempts; wait a minute and try again.")
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not _same(csrf, signer.sign("login", nonce)):
            raise HTTPRefusal(403, "The login form's security token is missing or wrong; reload the page.")
        try:
            user = service.authenticate(name, password)
        except AccountLocked as exc:
            return render(request, "login.html", 429, headers={"Retry-After": str(int(exc.retry_after_s) + 1)},
                          csrf=csrf, error=str(exc).capitalize(), user=None)
        except Forbidden as exc:  # the right password of a deactivated account
            return render(request, "login.html", 403, csrf=csrf, error=str(exc).capitalize(), user=None)
        if user is None:
            return render(request, "login.html", 401, csrf=csrf, error="Wrong name or password.", user=None)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, service.create_session(user.id, session_seconds), httponly=True,
                            samesite="strict", secure=secure_cookies, max_age=session_seconds)
        response.delete_cookie(LOGIN_COOKIE)
        return response

    @app.post("/logout")
    def logout(csrf: str = Form(""), s: tuple[UserInfo, str] = Depends(session)):
        check_csrf(s[1], csrf)
        service.end_session(s[1])
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE)
        return response

    # ---------------------------------------------------------------------------------------- account
    @app.get("/account")
    def account(request: Request, s: tuple[UserInfo, str] = Depends(session)) -> HTMLResponse:
        return render(request, "account.html", user=s[0], csrf=csrf_token(s[1]), error=None, message=None)

    @app.post("/account/password")
    def change_password(request: Request, csrf: str = Form(""), current: str = Form(""), new: str = Form(""),
                        again: str = Form(""), s: tuple[UserInfo, str] = Depends(session)) -> HTMLResponse:
        user, session_id = s
        check_csrf(session_id, csrf)
        page = dict(user=user, csrf=csrf_token(session_id), message=None)
        if new != again:
            return render(request, "account.html", 422, error="The two new passwords differ.", **page)
        try:
            service.change_password(user.id, current, new, keep_session=session_id)
        except AccountLocked as exc:
            return render(request, "account.html", exc.status, headers={"Retry-After": str(int(exc.retry_after_s) + 1)},
                          error=str(exc).capitalize(), **page)
        except FeedbackError as exc:
            return render(request, "account.html", exc.status, error=str(exc).capitalize(), **page)
        page["message"] = "Your password was changed; your other sessions were ended."
        return render(request, "account.html", error=None, **page)

    # ------------------------------------------------------------------------------------------ annotators
    @app.get("/")
    def home(request: Request, s: tuple[UserInfo, str] = Depends(annotator)) -> HTMLResponse:
        user, session_id = s
        rows = [(p, *service.user_progress(user.id, p.id)) for p in service.projects()]
        return render(request, "projects.html", user=user, csrf=csrf_token(session_id), rows=rows)

    @app.get("/p/{project_id}")
    def next_task(request: Request, project_id: Id, s: tuple[UserInfo, str] = Depends(annotator)) -> HTMLResponse:
        user, session_id = s
        project = service.project(project_id)
        done, left = service.user_progress(user.id, project_id)
        task = service.next_task(user.id, project_id)
        ctx = dict(user=user, csrf=csrf_token(session_id), project=project, done=done, left=left, flags=FLAGS)
        if task is None:
            return render(request, "done.html", **ctx)
        ctx.update(task=task, submission_id=uuid.uuid4().hex, strengths=STRENGTH_KEYS, shown=task.shown,
                   criteria=project.criteria, likert=LIKERT)
        return render(request, TEMPLATES["rubric" if project.rubric else project.mode], **ctx)

    @app.post("/p/{project_id}/submit")
    def submit(project_id: Id, csrf: str = Form(""), assignment_id: int = Form(..., ge=1, le=MAX_ID),
               submission_id: str = Form(...), outcome: str | None = Form(None), strength: str | None = Form(None),
               flags: list[str] = Form([]), rationale: str = Form(""),
               time_spent_ms: int | None = Form(None, ge=0, le=MAX_ID),
               rank_item: list[int] = Form([]), rank_value: list[str] = Form([]),
               criterion: list[str] = Form([]), verdict: list[str] = Form([]), verdict_strength: list[str] = Form([]),
               score_response: list[int] = Form([]), score_attribute: list[str] = Form([]),
               score_value: list[str] = Form([]),
               s: tuple[UserInfo, str] = Depends(annotator)):
        user, session_id = s
        check_csrf(session_id, csrf)
        task = service.task(user.id, assignment_id)  # Forbidden for another annotator's task
        if task.project.id != project_id:
            raise Forbidden("this task belongs to another project.")
        ranking = criteria = scores = None
        if task.project.mode == "ranking" and outcome != "skip":
            ranking = _tiers(rank_item, rank_value, len(task.responses))
            outcome = None
        if task.project.rubric and outcome != "skip":
            criteria = _verdicts(task, criterion, verdict, verdict_strength)
        if task.project.mode == "attributes" and outcome != "skip":
            scores = _scores(task, score_response, score_attribute, score_value)
        service.submit(user.id, assignment_id, submission_id, outcome=outcome or None,
                       strength=strength or None, ranking=ranking, criteria=criteria, scores=scores, flags=flags,
                       rationale=rationale, time_spent_ms=time_spent_ms)
        return RedirectResponse(f"/p/{project_id}", status_code=303)

    # ----------------------------------------------------------------------------------------------- admin
    @app.get("/admin")
    def admin_home(request: Request, s: tuple[UserInfo, str] = Depends(admin)) -> HTMLResponse:
        projects = service.projects()
        rows = [(p, service.progress(p.id)) for p in projects if p.run is None]
        runs: dict[str, list] = {}  # round projects under their run, runs by name, rounds in order
        for p in sorted((p for p in projects if p.run is not None), key=lambda p: (p.run, p.round)):
            runs.setdefault(p.run, []).append((p, service.progress(p.id)))
        return render(request, "admin.html", user=s[0], csrf=csrf_token(s[1]), rows=rows, runs=runs)

    @app.get("/admin/p/{project_id}")
    def admin_project(request: Request, project_id: Id, s: tuple[UserInfo, str] = Depends(admin)) -> HTMLResponse:
        project = service.project(project_id)
        per_criterion = service.agreement_by_criterion(project_id) if project.criteria else {}
        # a round's annotators are judged over the whole run: the same people label every round
        pool = service.round_projects(project.run) if project.run else [project]
        reliability, reliability_note = {}, None
        if project.mode == "pairwise":
            try:
                reliability = reliability_reports(service, pool)
            except FeedbackError as exc:  # e.g. a run mixing rubric and plain rounds
                reliability_note = str(exc)
        return render(request, "admin_project.html", user=s[0], csrf=csrf_token(s[1]), project=project,
                      progress=service.progress(project_id),
                      agreement=None if project.criteria else service.agreement(project_id),
                      per_criterion=per_criterion, flagged=service.flagged(project_id), reliability=reliability,
                      reliability_note=reliability_note, pool=pool)

    @app.get("/admin/p/{project_id}/export")
    def admin_export(project_id: Id, format: str = "pairs", criterion: str | None = None,
                     s: tuple[UserInfo, str] = Depends(admin)) -> Response:
        import json

        project = service.project(project_id)
        name = project.name
        if project.mode == "attributes":
            if format != "attributes" or criterion is not None:
                raise HTTPRefusal(422, f"Project {project.name} scores attributes; export it with format=attributes "
                                       "(and no criterion).")
            rows, _ = attribute_rows(service, project_id)
        elif format not in ("pairs", "ranking", "kto"):
            raise HTTPRefusal(422, "format must be pairs, ranking or kto.")
        elif criterion is not None:
            if not project.rubric:
                raise HTTPRefusal(422, f"Project {project.name} has no criteria; drop the criterion parameter.")
            if criterion not in project.criteria:
                raise HTTPRefusal(422, f"Criterion {criterion[:40]!r} is not one of project {project.name}'s "
                                       f"criteria ({', '.join(project.criteria)}).")
            rows = export_by_criterion(service, project_id, kto=format == "kto")[0][criterion]
            name = f"{project.name}.{criterion}"
        else:
            rows, _ = export_rows(service, project_id, kto=format == "kto",
                                  rankings_as="ranking" if format == "ranking" else "pairs")
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return Response(body, media_type="application/x-ndjson", headers={
            "Content-Disposition": f'attachment; filename="{name}-{format}.jsonl"'})

    @app.get("/admin/users")
    def admin_users(request: Request, s: tuple[UserInfo, str] = Depends(admin)) -> HTMLResponse:
        return render(request, "users.html", user=s[0], csrf=csrf_token(s[1]), accounts=service.accounts(),
                      now=time.time())

    @app.post("/admin/users/{user_id}/password")
    def admin_reset_password(user_id: Id, csrf: str = Form(""), password: str = Form(""),
                             s: tuple[UserInfo, str] = Depends(admin)):
        check_csrf(s[1], csrf)
        service.reset_password(user_id, password, keep_session=s[1])
        return RedirectResponse("/admin/users", status_code=303)

    def target(user_id: int) -> UserInfo:
        found = service.user(user_id)
        if found is None:
            raise NotFound(f"user {user_id} does not exist.")
        return found

    def deactivate(admin_user: UserInfo, session_id: str, user_id: int) -> None:
        if user_id == admin_user.id:
            raise Forbidden("you cannot deactivate your own account; ask another admin.")
        service.set_active(user_id, False)

    user_actions = {
        "deactivate": deactivate,
        "reactivate": lambda admin_user, session_id, user_id: service.set_active(user_id, True),
        "unlock": lambda admin_user, session_id, user_id: service.unlock(target(user_id).name),
        "revoke": lambda admin_user, session_id, user_id: service.revoke_sessions(user_id, keep=session_id),
    }

    @app.post("/admin/users/{user_id}/{action}")
    def admin_user_action(user_id: Id, action: str, csrf: str = Form(""), s: tuple[UserInfo, str] = Depends(admin)):
        if action not in user_actions:
            raise HTTPRefusal(404, f"There is no user action {action!r}.")
        check_csrf(s[1], csrf)
        target(user_id)
        user_actions[action](s[0], s[1], user_id)
        return RedirectResponse("/admin/users", status_code=303)

    return app


_RANK_RE = re.compile(r"[0-9]{1,3}")


def _tiers(items: list[int], values: list[str], k: int) -> list[list[int]]:
    """rank_item[i] got rank rank_value[i] (1 = best; equal ranks are ties) -> tiers best first."""
    if len(items) != len(values) or sorted(items) != list(range(k)):
        raise FeedbackError("the ranking form is incomplete; reload the page.")
    by_rank: dict[int, list[int]] = defaultdict(list)
    for item, value in zip(items, values):
        # ASCII digits only: str.isdigit() accepts "²", which int() refuses
        if not _RANK_RE.fullmatch(value.strip()) or not 1 <= int(value) <= k:
            raise FeedbackError(f"give every response a rank from 1 to {k} (1 = best) before submitting.")
        by_rank[int(value)].append(item)
    return [sorted(by_rank[r]) for r in sorted(by_rank)]


def _verdicts(task: Task, names: list[str], verdicts: list[str], strengths: list[str]) -> dict[str, Verdict]:
    """The rubric form's parallel fields (criterion[i] got verdict[i] with verdict_strength[i]) -> Verdicts. An
    empty verdict is refused here, naming the criterion; unknown or missing criteria by the service."""
    if not len(names) == len(verdicts) == len(strengths):
        raise FeedbackError("the rubric form is incomplete; reload the page.")
    out: dict[str, Verdict] = {}
    for name, verdict, strength in zip(names, verdicts, strengths):
        if name in out:
            raise FeedbackError(f"criterion {name[:40]!r} is answered twice; reload the page.")
        if name in task.project.criteria and not verdict:
            raise FeedbackError(f"criterion {name} is not answered; answer every criterion "
                                f"({', '.join(task.project.criteria)}) or skip the task.")
        out[name] = Verdict(verdict, strength or None)
    return out


_SCORE_RE = re.compile(r"[0-9]")


def _scores(task: Task, responses: list[int], attributes: list[str], values: list[str]) -> list[dict[str, Any]]:
    """The attribute form's parallel fields (response score_response[i] got score_value[i] on score_attribute[i])
    -> one {attribute: score} per response in item order. Empty and non-digit scores are refused here, naming
    the response by where it was shown; unknown or missing attributes by the service."""
    k = len(task.responses)
    if not len(responses) == len(attributes) == len(values) or any(not 0 <= i < k for i in responses):
        raise FeedbackError("the scoring form is incomplete; reload the page.")
    scores: list[dict[str, Any]] = [{} for _ in range(k)]
    for i, attribute, value in zip(responses, attributes, values):
        shown = task.display_order.index(i) + 1
        if attribute in scores[i]:
            raise FeedbackError(f"response {shown}'s {attribute[:40]!r} is scored twice; reload the page.")
        value = value.strip()
        if attribute in task.project.criteria and not _SCORE_RE.fullmatch(value):
            raise FeedbackError(f"response {shown} has no {attribute} score from {LIKERT[0]} to {LIKERT[-1]}; score "
                                "every attribute of every response, or skip the task.")
        if _SCORE_RE.fullmatch(value) and int(value) not in LIKERT:
            raise FeedbackError(f"response {shown}: the {attribute[:40]} score must be an integer from {LIKERT[0]} "
                                f"to {LIKERT[-1]}, got {value}.")
        scores[i][attribute] = int(value) if _SCORE_RE.fullmatch(value) else value
    return scores


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def uvicorn_options(trusted_proxies: Sequence[str]) -> dict[str, Any]:
    """uvicorn's proxy settings: believe X-Forwarded-For / X-Forwarded-Proto only from the named proxies. uvicorn's
    own default believes them from 127.0.0.1, so any client reaching the app through a local hop (or a proxy that
    passes the header on) could name its own address and so dodge the per-address login limit."""
    if not trusted_proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": list(trusted_proxies)}


def run_server(db: str, host: str = "127.0.0.1", port: int = 8000, secret_file: str = "",
               rate_limit: int = 120, secure_cookies: bool = False, trusted_proxies: Sequence[str] = (),
               max_body_bytes: int = MAX_BODY_BYTES) -> None:
    import uvicorn

    store = open_store(db)
    key = load_or_create_secret(secret_file or default_secret_file(db))
    app = create_app(FeedbackService(store), key, rate_limit=rate_limit, secure_cookies=secure_cookies,
                     max_body_bytes=max_body_bytes)
    if not _is_loopback(host):
        log.warning("serving on %s: other machines can reach this app; put it behind HTTPS", host)
    if (trusted_proxies or not _is_loopback(host)) and not secure_cookies:
        log.warning("cookies are not marked Secure; behind an HTTPS proxy pass --secure-cookies")
    log.info("labelling app on http://%s:%d", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", **uvicorn_options(trusted_proxies))
