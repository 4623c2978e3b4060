"""A corpus of malformed, hostile and unlucky requests against the labelling app (bad types, integer overflow,
huge and deeply nested bodies, wrong content types, bad cookies, sessions and CSRF tokens, wrong methods and
paths): each gets the status it should (never a 5xx), every response carries the security headers, and the app
serves a normal labelling session afterwards."""

import gzip
import json
import re

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.feedback.web.app import create_app, load_or_create_secret  # noqa: E402

from .web_helpers import PASSWORD, assert_secure_headers, field, login, populate  # noqa: E402

BIG = str(2**70)
FORM = {"content-type": "application/x-www-form-urlencoded"}
MIB = 1024 * 1024


def multipart(fields: list[tuple[str, str]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                    for k, v in fields) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def chunked(total: int):
    for _ in range(total // 65536):
        yield b"a" * 65536


def corpus(ctx: dict) -> list[tuple[str, str, str, str, dict, int]]:
    """(what, client, method, url, httpx keyword arguments, expected status)."""
    pid, rid = ctx["pairs"], ctx["ranks"]
    L, A, B = ctx["login_csrf"], ctx["ann_csrf"], ctx["boss_csrf"]
    task, rank = ctx["task"], ctx["rank_task"]
    submit, rsubmit = f"/p/{pid}/submit", f"/p/{rid}/submit"
    ann_id = ctx["ann_id"]
    login_ok = {"name": "ann", "password": "wrong-password", "csrf": L}
    mp_login, mp_login_h = multipart([("name", "ann"), ("password", "x"), ("csrf", L)] * 1)
    many_fields, many_fields_h = multipart([(f"f{i}", "v") for i in range(1500)])
    mp_overflow, mp_overflow_h = multipart([("csrf", A), ("assignment_id", BIG),
                                            ("submission_id", task["submission_id"])])
    no_boundary = {"content-type": "multipart/form-data"}
    deep = "[" * 100_000 + "]" * 100_000
    deep_obj = '{"a":' * 50_000 + "1" + "}" * 50_000
    ranked = {"csrf": A, "assignment_id": rank["assignment_id"], "submission_id": rank["submission_id"],
              "rank_item": rank["items"], "outcome": ""}
    return [
        # --------------------------------------------------------------------------------------- login
        ("login: empty body", "anon", "POST", "/login", {}, 403),
        ("login: JSON body", "anon", "POST", "/login", {"json": {"name": "ann", "password": PASSWORD, "csrf": L}},
         403),
        ("login: JSON nested 100k deep", "anon", "POST", "/login",
         {"content": deep, "headers": {"content-type": "application/json"}}, 403),
        ("login: JSON object nested 50k deep", "anon", "POST", "/login",
         {"content": deep_obj, "headers": {"content-type": "application/json"}}, 403),
        ("login: text/plain body", "anon", "POST", "/login",
         {"content": "name=ann&password=x", "headers": {"content-type": "text/plain"}}, 403),
        ("login: multipart without a boundary", "anon", "POST", "/login",
         {"content": b"--x\r\n\r\n", "headers": no_boundary}, 400),
        ("login: multipart with 1,500 fields", "anon", "POST", "/login",
         {"content": many_fields, "headers": many_fields_h}, 400),
        ("login: multipart, wrong password", "anon", "POST", "/login", {"content": mp_login, "headers": mp_login_h},
         401),
        ("login: a file where the password goes", "anon", "POST", "/login",
         {"data": {"name": "ann", "csrf": L}, "files": {"password": ("p.txt", b"long-enough-pw")}}, 400),
        ("login: invalid percent escapes", "anon", "POST", "/login",
         {"content": "name=%ZZ&password=%&csrf=%G1", "headers": FORM}, 403),
        ("login: bytes that are not UTF-8", "anon", "POST", "/login",
         {"content": b"name=\xff\xfe&password=\xc3\x28&csrf=" + L.encode(), "headers": FORM}, 401),
        ("login: form declared UTF-16", "anon", "POST", "/login",
         {"content": "name=ann".encode("utf-16"),
          "headers": {"content-type": "application/x-www-form-urlencoded; charset=utf-16"}}, 403),
        ("login: gzip-encoded form", "anon", "POST", "/login",
         {"content": gzip.compress(b"name=ann&password=x"), "headers": {**FORM, "content-encoding": "gzip"}}, 403),
        ("login: 100k-character name", "anon", "POST", "/login", {"data": {**login_ok, "name": "a" * 100_000}}, 401),
        ("login: NUL bytes in the password", "anon", "POST", "/login", {"data": {**login_ok, "password": "\x00" * 64}},
         401),
        ("login: repeated fields", "anon", "POST", "/login",
         {"content": f"name=ann&name=bob&password=x&password=y&csrf={L}&csrf=x", "headers": FORM}, 403),
        ("login: 2 MiB body", "anon", "POST", "/login",
         {"content": b"name=" + b"a" * (2 * MIB), "headers": FORM}, 413),
        ("login: 2 MiB chunked body without a length", "anon", "POST", "/login",
         {"content": chunked(2 * MIB), "headers": FORM}, 413),
        ("login: forged token", "anon", "POST", "/login", {"data": {**login_ok, "csrf": "forged"}}, 403),
        ("login: non-ASCII token", "anon", "POST", "/login", {"data": {**login_ok, "csrf": "\u00e9\u4e2d" * 20}}, 403),
        ("login: a session's CSRF token", "anon", "POST", "/login", {"data": {**login_ok, "csrf": A}}, 403),
        ("login: token without its cookie", "bare", "POST", "/login", {"data": login_ok}, 403),
        ("login: 8 KB login cookie", "bare", "POST", "/login",
         {"data": login_ok, "headers": {"cookie": "rlhfkit_login=" + "x" * 8000}}, 403),
        ("login page: junk query", "bare", "GET", "/login?next=//evil.example&%00=%ff", {}, 200),
        # ---------------------------------------------------------------------------------- cookies
        ("session: garbage cookie", "bare", "GET", "/", {"headers": {"cookie": "rlhfkit_session=garbage"}}, 303),
        ("session: 8 KB cookie", "bare", "GET", "/", {"headers": {"cookie": "rlhfkit_session=" + "A" * 8000}}, 303),
        ("session: bytes that are not ASCII", "bare", "GET", "/",
         {"headers": {"cookie": b"rlhfkit_session=\xff\xfe\xe9t\xe9"}}, 303),
        ("session: a well-formed token nobody was given", "bare", "GET", "/",
         {"headers": {"cookie": "rlhfkit_session=" + "Q" * 43}}, 303),
        ("session: the old signed-cookie format", "bare", "GET", "/",
         {"headers": {"cookie": f"rlhfkit_session={ann_id}.99999999999.nonce.mac"}}, 303),
        ("session: 300 cookies", "bare", "GET", "/",
         {"headers": {"cookie": "; ".join(f"c{i}=v" for i in range(300))}}, 303),
        ("session: non-ASCII Authorization header", "bare", "GET", "/",
         {"headers": {"authorization": "Bearer \xe9\xe8".encode("latin-1")}}, 303),
        ("submit without a session", "bare", "POST", submit, {"data": {"csrf": A, **task}}, 403),
        ("logout without a session", "bare", "POST", "/logout", {"data": {"csrf": A}}, 403),
        # ------------------------------------------------------------------------------ paths, methods
        ("path: project id 2**70", "ann", "GET", f"/p/{BIG}", {}, 400),
        ("path: project id -2**70", "ann", "GET", f"/p/-{BIG}", {}, 400),
        ("path: project id not a number", "ann", "GET", "/p/abc", {}, 400),
        ("path: project id 1e3", "ann", "GET", "/p/1e3", {}, 400),
        ("path: project id NUL", "ann", "GET", "/p/%00", {}, 400),
        ("path: project id NaN", "ann", "GET", "/p/NaN", {}, 400),
        ("path: unknown project", "ann", "GET", "/p/987654", {}, 404),
        ("path: admin project 2**70", "boss", "GET", f"/admin/p/{BIG}", {}, 400),
        ("path: export of project 2**70", "boss", "GET", f"/admin/p/{BIG}/export", {}, 400),
        ("path: export format <script>", "boss", "GET", f"/admin/p/{pid}/export?format=<script>", {}, 422),
        ("path: export format 10k long", "boss", "GET", f"/admin/p/{pid}/export?format={'x' * 10_000}", {}, 422),
        ("path: static traversal", "bare", "GET", "/static/../../etc/passwd", {}, 404),
        ("path: encoded static traversal", "bare", "GET", "/static/%2e%2e/app.py", {}, 404),
        ("path: 60k-character path", "bare", "GET", "/" + "a" * 60_000, {}, 404),
        ("method: PUT /login", "bare", "PUT", "/login", {}, 405),
        ("method: DELETE a project", "ann", "DELETE", f"/p/{pid}", {}, 405),
        ("method: PATCH submit", "ann", "PATCH", submit, {}, 405),
        ("method: GET submit", "ann", "GET", submit, {}, 405),
        ("method: OPTIONS /", "bare", "OPTIONS", "/", {}, 405),
        # ------------------------------------------------------------------------------------- submit
        ("submit: assignment id 2**70", "ann", "POST", submit, {"data": {**task, "csrf": A, "outcome": "tie",
                                                                         "assignment_id": BIG}}, 400),
        ("submit: assignment id -2**70", "ann", "POST", submit, {"data": {**task, "csrf": A, "outcome": "tie",
                                                                          "assignment_id": "-" + BIG}}, 400),
        ("submit: assignment id not a number", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "assignment_id": "abc"}}, 400),
        ("submit: assignment id 1.5", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "assignment_id": "1.5"}}, 400),
        ("submit: no assignment id", "ann", "POST", submit, {"data": {"csrf": A, "outcome": "tie",
                                                                     "submission_id": task["submission_id"]}}, 400),
        ("submit: unknown assignment", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "assignment_id": "987654"}}, 404),
        ("submit: time spent 2**70 ms", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "time_spent_ms": BIG}}, 400),
        ("submit: negative time spent", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "time_spent_ms": "-1"}}, 400),
        ("submit: time spent NaN", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "time_spent_ms": "NaN"}}, 400),
        ("submit: time spent 1e309", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "time_spent_ms": "1e309"}}, 400),
        ("submit: unknown outcome", "ann", "POST", submit, {"data": {**task, "csrf": A, "outcome": "evil"}}, 422),
        ("submit: unknown strength", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "A", "strength": "infinitely"}}, 422),
        ("submit: unknown flag, 900 times", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "flags": ["evil"] * 900}}, 422),
        ("submit: 5,000 fields (the form parser allows 1,000)", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "flags": ["harmful"] * 5000}}, 400),
        ("submit: non-ASCII CSRF token", "ann", "POST", submit, {"data": {**task, "csrf": "\u00e9" * 43,
                                                                          "outcome": "tie"}}, 403),
        ("submit: 10k-character submission id", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "submission_id": "a" * 10_000}}, 422),
        ("submit: non-ASCII submission id", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "submission_id": "\u00e9" * 16}}, 422),
        ("submit: rationale over the limit", "ann", "POST", submit,
         {"data": {**task, "csrf": A, "outcome": "tie", "rationale": "r" * 6000}}, 422),
        ("submit: no CSRF token", "ann", "POST", submit, {"data": {**task, "outcome": "tie"}}, 403),
        ("submit: another session's token", "ann", "POST", submit, {"data": {**task, "csrf": B, "outcome": "tie"}},
         403),
        ("submit: the login form's token", "ann", "POST", submit, {"data": {**task, "csrf": L, "outcome": "tie"}},
         403),
        ("submit: JSON body", "ann", "POST", submit, {"json": {**task, "csrf": A, "outcome": "tie"}}, 400),
        ("submit: deeply nested JSON", "ann", "POST", submit,
         {"content": deep, "headers": {"content-type": "application/json"}}, 400),
        ("submit: multipart with an overflowing id", "ann", "POST", submit,
         {"content": mp_overflow, "headers": mp_overflow_h}, 400),
        ("submit: someone else's task", "boss", "POST", submit, {"data": {**task, "csrf": B, "outcome": "tie"}}, 403),
        ("ranking: superscript digit as a rank", "ann", "POST", rsubmit,
         {"data": {**ranked, "rank_value": ["\u00b2", "1", "3"]}}, 422),
        ("ranking: rank 10**30", "ann", "POST", rsubmit,
         {"data": {**ranked, "rank_value": ["1" + "0" * 30, "1", "2"]}}, 422),
        ("ranking: negative rank", "ann", "POST", rsubmit, {"data": {**ranked, "rank_value": ["-1", "1", "2"]}}, 422),
        ("ranking: response index 2**70", "ann", "POST", rsubmit,
         {"data": {**ranked, "rank_item": [BIG, "0", "1"], "rank_value": ["1", "2", "3"]}}, 422),
        ("ranking: fewer ranks than responses", "ann", "POST", rsubmit, {"data": {**ranked, "rank_value": ["1"]}},
         422),
        # -------------------------------------------------------------------------------------- admin
        ("admin: an annotator asks for the admin page", "ann", "GET", "/admin", {}, 403),
        ("admin: an annotator deactivates a user", "ann", "POST", f"/admin/users/{ann_id}/deactivate",
         {"data": {"csrf": A}}, 403),
        ("admin: user id 2**70", "boss", "POST", f"/admin/users/{BIG}/deactivate", {"data": {"csrf": B}}, 400),
        ("admin: user id not a number", "boss", "POST", "/admin/users/abc/unlock", {"data": {"csrf": B}}, 400),
        ("admin: unknown user", "boss", "POST", "/admin/users/987654/revoke", {"data": {"csrf": B}}, 404),
        ("admin: unknown action", "boss", "POST", f"/admin/users/{ann_id}/promote", {"data": {"csrf": B}}, 404),
        ("admin: 10k-character new password", "boss", "POST", f"/admin/users/{ann_id}/password",
         {"data": {"csrf": B, "password": "p" * 10_000}}, 422),
        ("admin: no new password", "boss", "POST", f"/admin/users/{ann_id}/password", {"data": {"csrf": B}}, 422),
        ("admin: reset without a token", "boss", "POST", f"/admin/users/{ann_id}/password",
         {"data": {"password": "whatever-long"}}, 403),
        # ------------------------------------------------------------------------------------ account
        ("account: change with no fields", "ann", "POST", "/account/password", {}, 403),
        ("account: new password too short", "ann", "POST", "/account/password",
         {"data": {"csrf": A, "current": PASSWORD, "new": "short", "again": "short"}}, 422),
        ("account: new passwords differ", "ann", "POST", "/account/password",
         {"data": {"csrf": A, "current": PASSWORD, "new": "long-enough-1", "again": "long-enough-2"}}, 422),
        ("account: wrong current password", "ann", "POST", "/account/password",
         {"data": {"csrf": A, "current": "wrong-password", "new": "long-enough-1", "again": "long-enough-1"}}, 403),
    ]


def test_malformed_requests_get_4xx_with_security_headers_and_the_app_still_serves(svc, tmp_path, capsys):
    ids = populate(svc)
    app = create_app(svc, load_or_create_secret(tmp_path / "key"), rate_limit=100_000)

    def client():
        return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)

    clients = {"anon": client(), "bare": client(), "ann": client(), "boss": client()}
    assert login(clients["ann"], "ann").status_code == 303 and login(clients["boss"], "boss").status_code == 303
    page = clients["ann"].get(f"/p/{ids['pairs']}").text
    rank_page = clients["ann"].get(f"/p/{ids['ranks']}").text
    ctx = {"pairs": ids["pairs"], "ranks": ids["ranks"], "ann_id": svc.user_by_name("ann").id,
           "login_csrf": field(clients["anon"].get("/login").text, "csrf"),
           "ann_csrf": field(page, "csrf"), "boss_csrf": field(clients["boss"].get("/").text, "csrf"),
           "task": {k: field(page, k) for k in ("assignment_id", "submission_id")},
           "rank_task": {"assignment_id": field(rank_page, "assignment_id"),
                         "submission_id": field(rank_page, "submission_id"),
                         "items": re.findall(r'name="rank_item" value="(\d)"', rank_page)}}
    cases = corpus(ctx)
    assert len(cases) >= 40
    wrong, server_errors = [], 0
    for what, who, method, url, kwargs, expected in cases:
        r = clients[who].request(method, url, follow_redirects=False, **kwargs)
        server_errors += r.status_code >= 500
        if r.status_code != expected:
            wrong.append(f"{what}: {r.status_code} (expected {expected}) {r.text[:120]!r}")
        assert_secure_headers(r)
    assert wrong == []
    assert server_errors == 0
    with capsys.disabled():
        print(f"\nlabelling app: {len(cases)} malformed requests, {server_errors} answered 5xx")

    # the app still serves: a fresh login, a judgment, the admin's export
    ann = client()
    assert login(ann, "ann").status_code == 303
    page = ann.get(f"/p/{ids['pairs']}").text
    form = {k: field(page, k) for k in ("csrf", "assignment_id", "submission_id")}
    assert ann.post(f"/p/{ids['pairs']}/submit", data={**form, "outcome": "tie"},
                    follow_redirects=False).status_code == 303
    export = clients["boss"].get(f"/admin/p/{ids['pairs']}/export?format=pairs")
    assert export.status_code == 200
    assert [json.loads(line)["annotator"] for line in export.text.splitlines()] == []  # a tie exports no pair
    assert [j["outcome"] for j in svc.judged_items(ids["pairs"])] == ["tie"]
