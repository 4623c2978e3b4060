"""The web app through FastAPI's TestClient: login, CSRF, roles, escaping, labelling and export."""

import json
import os
import re
import stat

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.data.preference import read_preferences  # noqa: E402
from rlhfkit.errors import UserError  # noqa: E402
from rlhfkit.feedback.web.app import create_app, load_or_create_secret  # noqa: E402

from .web_helpers import SQLI, XSS, field, login, populate  # noqa: E402


def client_for(app, name=None):
    c = TestClient(app, base_url="http://127.0.0.1")
    if name:
        assert login(c, name).status_code == 303
    return c


def open_task(c, project_id):
    page = c.get(f"/p/{project_id}")
    assert page.status_code == 200, page.text
    return page.text, {k: field(page.text, k) for k in ("csrf", "assignment_id", "submission_id")}


def test_login_sets_a_safe_cookie_and_every_page_has_a_strict_csp(app):
    c = client_for(app)
    page = c.get("/login")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert c.post("/login", data={"name": "ann", "password": "long-enough-pw"}).status_code == 403  # no token
    bad = c.post("/login", data={"name": "ann", "password": "wrong-password", "csrf": field(page.text, "csrf")})
    assert bad.status_code == 401 and "Wrong name or password" in bad.text
    ok = login(c, "ann")
    cookie = ok.headers["set-cookie"]
    assert "rlhfkit_session=" in cookie and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    assert c.get("/", follow_redirects=False).status_code == 200
    assert client_for(app).get("/", follow_redirects=False).headers["location"] == "/login"


def test_labelling_over_http_records_the_judgment_and_its_display_order(app, svc):
    c = client_for(app, "ann")
    pid = app.state.ids["pairs"]
    html, f = open_task(c, pid)
    assert "<kbd>1</kbd>" in html and "<kbd>t</kbd>" in html and "<kbd>z</kbd>" in html  # shortcuts shown
    left_value = re.search(r'value="([AB])" data-key="1"', html).group(1)
    r = c.post(f"/p/{pid}/submit", data={**f, "outcome": left_value, "strength": "better", "flags": ["harmful"],
                                         "rationale": "left is right", "time_spent_ms": "1234"},
               follow_redirects=False)
    assert r.status_code == 303
    again = c.post(f"/p/{pid}/submit", data={**f, "outcome": left_value, "strength": "better"},
                   follow_redirects=False)  # a retry (double click, reload) is acknowledged, not stored twice
    assert again.status_code == 303
    (j,) = svc.judged_items(pid)
    assert j["outcome"] == left_value and j["flags"] == ["harmful"] and j["rationale"] == "left is right"
    shown_left = j["display_order"][0]
    assert left_value == "AB"[shown_left]
    rank_html, rf = open_task(c, app.state.ids["ranks"])
    items = re.findall(r'name="rank_item" value="(\d)"', rank_html)
    r = c.post(f"/p/{app.state.ids['ranks']}/submit", data={**rf, "rank_item": items, "rank_value": ["2", "1", "2"],
                                                           "outcome": ""}, follow_redirects=False)
    assert r.status_code == 303
    ranking = [x["ranking"] for x in svc.judged_items(app.state.ids["ranks"])][0]
    assert ranking == [[int(items[1])], sorted([int(items[0]), int(items[2])])]  # equal ranks are a tie


def test_posts_without_the_sessions_csrf_token_are_refused(app, svc):
    ann, bob = client_for(app, "ann"), client_for(app, "bob")
    pid = app.state.ids["pairs"]
    _, f = open_task(ann, pid)
    _, bob_f = open_task(bob, pid)
    for token in ("", "forged", bob_f["csrf"]):  # none, made up, another session's
        r = ann.post(f"/p/{pid}/submit", data={**f, "csrf": token, "outcome": "tie"}, follow_redirects=False)
        assert r.status_code == 403
    assert ann.post("/logout", data={}, follow_redirects=False).status_code == 403
    assert svc.judged_items(pid) == []


def test_another_users_task_and_session_are_refused(app, svc):
    ann, bob = client_for(app, "ann"), client_for(app, "bob")
    pid = app.state.ids["pairs"]
    _, f = open_task(ann, pid)
    _, bob_f = open_task(bob, pid)
    # bob submits on ann's task with his own valid session and token
    r = bob.post(f"/p/{pid}/submit", data={**f, "csrf": bob_f["csrf"], "outcome": "tie"}, follow_redirects=False)
    assert r.status_code == 403
    # a tampered cookie (ann's token with a character changed, or with bob's user id in front) is no session
    cookie = ann.cookies.get("rlhfkit_session")
    bob_id = svc.user_by_name("bob").id
    for tampered in (cookie[:-1] + ("A" if cookie[-1] != "A" else "B"), f"{bob_id}.{cookie}"):
        forged = TestClient(app, base_url="http://127.0.0.1")
        forged.cookies.set("rlhfkit_session", tampered)
        assert forged.get("/", follow_redirects=False).status_code == 303
        assert forged.post(f"/p/{pid}/submit", data={**f, "outcome": "tie"},
                           follow_redirects=False).status_code == 403
    assert svc.judged_items(pid) == []


def test_annotators_cannot_reach_admin_endpoints(app):
    ann, boss = client_for(app, "ann"), client_for(app, "boss")
    pid = app.state.ids["pairs"]
    for path in ("/admin", f"/admin/p/{pid}", f"/admin/p/{pid}/export?format=pairs"):
        assert ann.get(path, follow_redirects=False).status_code == 403, path
        assert boss.get(path, follow_redirects=False).status_code == 200, path
        assert client_for(app).get(path, follow_redirects=False).status_code == 303, path  # to the login page


def test_xss_payloads_render_as_text_and_sql_strings_are_stored_verbatim(app, svc):
    ann, boss = client_for(app, "ann"), client_for(app, "boss")
    pid = app.state.ids["pairs"]
    seen = ""
    for _ in range(6):
        html, f = open_task(ann, pid)
        seen += html
        for payload in XSS:
            assert payload not in html or "<" not in payload
        r = ann.post(f"/p/{pid}/submit", data={**f, "outcome": "tie", "rationale": SQLI[0] + XSS[0]},
                     follow_redirects=False)
        assert r.status_code == 303
    assert "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;" in seen and "<script>alert" not in seen
    assert "&lt;b&gt;not bold&lt;/b&gt;" in seen  # admin-written instructions are text too
    for s in SQLI:
        assert s.replace("'", "&#39;").replace('"', "&#34;") in seen  # shown verbatim (escaped for HTML)
    assert all(j["rationale"] == SQLI[0] + XSS[0] for j in svc.judged_items(pid))
    admin_page = boss.get(f"/admin/p/{pid}").text
    assert "<script>alert" not in admin_page
    assert len(svc.projects()) == 2 and svc.user_by_name("ann").role == "annotator"  # nothing was executed


def test_admin_exports_rows_the_trainers_read(app, svc, tmp_path):
    ann, bob, boss = client_for(app, "ann"), client_for(app, "bob"), client_for(app, "boss")
    pid = app.state.ids["pairs"]
    for c in (ann, bob):
        for _ in range(6):
            html, f = open_task(c, pid)
            right = re.search(r'value="([AB])" data-key="2"', html).group(1)
            c.post(f"/p/{pid}/submit", data={**f, "outcome": right, "strength": "slightly_better"})
    page = boss.get(f"/admin/p/{pid}").text
    assert "6 of 6 items" in page and "Krippendorff" in page
    r = boss.get(f"/admin/p/{pid}/export?format=pairs")
    assert r.headers["content-disposition"].startswith("attachment")
    path = tmp_path / "export.jsonl"
    path.write_bytes(r.content)
    rows = read_preferences(str(path))
    assert len(rows) == 12 and {p.annotator for p in rows} == {"ann", "bob"}
    assert all(json.loads(line)["item_id"] for line in r.text.splitlines())
    assert boss.get(f"/admin/p/{pid}/export?format=evil").status_code == 422


def test_rate_limit_refuses_a_flood(svc, tmp_path):
    populate(svc)
    c = TestClient(create_app(svc, load_or_create_secret(tmp_path / "k"), rate_limit=5), base_url="http://127.0.0.1")
    assert login(c, "ann").status_code == 303
    codes = [c.get("/").status_code for _ in range(7)]
    assert codes[:5] == [200] * 5 and codes[-1] == 429


def test_secret_key_is_created_owner_only_and_a_readable_one_is_refused(tmp_path):
    path = tmp_path / "keys" / "secret_key"
    key = load_or_create_secret(path)
    assert len(key) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(path) == key
    os.chmod(path, 0o644)
    with pytest.raises(UserError, match="chmod 600"):
        load_or_create_secret(path)


def test_templates_never_mark_text_safe():
    from pathlib import Path

    import rlhfkit.feedback.web as web

    for template in (Path(web.__file__).parent / "templates").glob("*.html"):
        text = template.read_text()
        assert "|safe" not in text.replace(" ", "") and "autoescape false" not in text, template.name
        assert "<script>" not in text and "style=" not in text, f"inline script or style in {template.name}"
        assert not re.search(r"\son[a-z]+=", text), f"inline handler in {template.name}"
