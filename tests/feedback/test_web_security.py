"""Issue 17, the labelling app: account lockout, server-side sessions (logout, revocation, deactivation, password
changes), an owner-only database, 400 (not 500) on integer overflow, the security headers on every error path, a
request-body limit and the serve flags (--trusted-proxy, --secure-cookies, --max-body-bytes)."""

import os
import stat

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from rlhfkit.errors import ConfigError  # noqa: E402
from rlhfkit.feedback import service as service_mod  # noqa: E402
from rlhfkit.feedback.service import AccountLocked, FeedbackService, Forbidden  # noqa: E402
from rlhfkit.feedback.store import open_store  # noqa: E402
from rlhfkit.feedback.web.app import create_app, load_or_create_secret  # noqa: E402

from .web_helpers import PASSWORD, assert_secure_headers, field, login, populate  # noqa: E402

NEW_PASSWORD = "another-long-pw"


def client_for(app, name=None, password=PASSWORD):
    c = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    if name:
        assert login(c, name, password).status_code == 303
    return c


def with_cookie(app, cookie):
    c = TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)
    c.cookies.set("rlhfkit_session", cookie)
    return c


def logged_in(c) -> bool:
    r = c.get("/", follow_redirects=False)
    assert r.status_code in (200, 303), r.status_code
    return r.status_code == 200


def csrf_of(c, path="/"):
    return field(c.get(path).text, "csrf")


# ------------------------------------------------------------------------------------------- 5: lockout
def test_repeated_failures_lock_the_account_with_back_off_that_survives_a_restart(svc, store, monkeypatch):
    svc.add_user("ann", "annotator", PASSWORD)
    clock = [1000.0]
    monkeypatch.setattr(service_mod, "now", lambda: clock[0])
    for _ in range(5):
        assert svc.authenticate("ann", "wrong-password") is None
    with pytest.raises(AccountLocked) as locked:  # the right password is refused while locked
        svc.authenticate("ann", PASSWORD)
    assert locked.value.status == 429 and locked.value.retry_after_s == pytest.approx(60)
    # a restart (a new service on a reopened store) keeps the lock: it is in the database
    again = FeedbackService(open_store(store.url))
    with pytest.raises(AccountLocked):
        again.authenticate("ann", PASSWORD)
    clock[0] += 61  # the lock lapses; one more failure locks for twice as long (back-off)
    assert again.authenticate("ann", "wrong-password") is None
    with pytest.raises(AccountLocked) as locked:
        again.authenticate("ann", PASSWORD)
    assert locked.value.retry_after_s == pytest.approx(120)
    clock[0] += 10**6  # the back-off is capped, so after the cap a single try is allowed again
    for _ in range(40):  # however many failures: the lock never exceeds an hour
        assert again.authenticate("ann", "wrong-password") is None
        clock[0] += 3601
    assert again.authenticate("ann", "wrong-password") is None
    with pytest.raises(AccountLocked) as locked:
        again.authenticate("ann", PASSWORD)
    assert locked.value.retry_after_s == pytest.approx(3600)
    again.unlock("ann")  # an admin unlocks; the counter starts over
    assert again.authenticate("ann", PASSWORD).name == "ann"
    for _ in range(4):
        assert again.authenticate("ann", "wrong-password") is None
    assert again.authenticate("ann", PASSWORD).name == "ann"  # a success resets the count
    assert again.authenticate("ann", "wrong-password") is None
    assert again.authenticate("ann", PASSWORD).name == "ann"


def test_unknown_names_lock_like_real_ones_so_the_lock_reveals_no_account(svc):
    svc.add_user("ann", "annotator", PASSWORD)
    for name in ("ann", "nobody"):
        for _ in range(5):
            assert svc.authenticate(name, "wrong-password") is None
        with pytest.raises(AccountLocked):
            svc.authenticate(name, "anything-at-all")


def test_the_login_page_says_the_account_is_locked_and_an_admin_unlocks_it(app, svc):
    c = client_for(app)
    for _ in range(5):
        r = login(c, "ann", "wrong-password")
        assert r.status_code == 401
    r = login(c, "ann")
    assert r.status_code == 429 and "locked" in r.text and int(r.headers["retry-after"]) > 0
    assert_secure_headers(r)
    boss = client_for(app, "boss")
    page = boss.get("/admin/users")
    assert page.status_code == 200 and "locked" in page.text
    ann_id = svc.user_by_name("ann").id
    r = boss.post(f"/admin/users/{ann_id}/unlock", data={"csrf": field(page.text, "csrf")}, follow_redirects=False)
    assert r.status_code == 303
    assert login(c, "ann").status_code == 303


# ------------------------------------------------------------------------------------------- 6: sessions
def test_logout_ends_the_session_on_the_server(app):
    ann = client_for(app, "ann")
    cookie = ann.cookies.get("rlhfkit_session")
    assert logged_in(with_cookie(app, cookie))
    r = ann.post("/logout", data={"csrf": csrf_of(ann)}, follow_redirects=False)
    assert r.status_code == 303
    assert not logged_in(with_cookie(app, cookie))  # a copy of the cookie kept before logout is dead too


def test_the_session_cookie_is_a_random_token_and_the_database_stores_only_its_hash(app, store):
    ann = client_for(app, "ann")
    cookie = ann.cookies.get("rlhfkit_session")
    assert len(cookie) >= 40
    with store.engine.connect() as conn:
        ids = [i for (i,) in conn.exec_driver_sql("select id from sessions")]
    assert ids and cookie not in ids and not any(cookie in i or i in cookie for i in ids)
    assert not logged_in(with_cookie(app, cookie[:-2] + ("AA" if cookie[-2:] != "AA" else "BB")))


def test_an_admin_revokes_sessions_and_deactivates_a_user_at_once(app, svc):
    ann, ann2 = client_for(app, "ann"), client_for(app, "ann")
    boss = client_for(app, "boss")
    ann_id = svc.user_by_name("ann").id
    page = boss.get("/admin/users")
    assert page.status_code == 200 and "ann" in page.text
    token = field(page.text, "csrf")
    assert boss.post(f"/admin/users/{ann_id}/revoke", data={"csrf": token}, follow_redirects=False).status_code == 303
    assert not logged_in(ann) and not logged_in(ann2)
    ann = client_for(app, "ann")
    assert boss.post(f"/admin/users/{ann_id}/deactivate", data={"csrf": token},
                     follow_redirects=False).status_code == 303
    assert not logged_in(ann)  # no wait for an expiry
    r = login(client_for(app), "ann")
    assert r.status_code == 403 and "deactivated" in r.text
    assert boss.post(f"/admin/users/{ann_id}/reactivate", data={"csrf": token},
                     follow_redirects=False).status_code == 303
    assert logged_in(client_for(app, "ann"))
    # an annotator reaches none of this, and an admin needs the session's token
    assert ann2.post(f"/admin/users/{ann_id}/deactivate", data={"csrf": token}).status_code == 403
    assert boss.post(f"/admin/users/{ann_id}/deactivate", data={"csrf": "forged"}).status_code == 403
    boss_id = svc.user_by_name("boss").id
    assert boss.post(f"/admin/users/{boss_id}/deactivate", data={"csrf": token}).status_code == 403  # not oneself
    assert svc.user_by_name("ann") is not None and logged_in(boss)


def test_an_admin_resets_a_password_which_ends_the_users_sessions(app, svc):
    ann, boss = client_for(app, "ann"), client_for(app, "boss")
    ann_id = svc.user_by_name("ann").id
    token = csrf_of(boss, "/admin/users")
    r = boss.post(f"/admin/users/{ann_id}/password", data={"csrf": token, "password": "short"})
    assert r.status_code == 422 and "at least 8" in r.text
    r = boss.post(f"/admin/users/{ann_id}/password", data={"csrf": token, "password": NEW_PASSWORD},
                  follow_redirects=False)
    assert r.status_code == 303
    assert not logged_in(ann)
    assert login(client_for(app), "ann").status_code == 401
    assert logged_in(client_for(app, "ann", NEW_PASSWORD))


def test_a_user_changes_their_password_with_the_current_one_and_other_sessions_end(app):
    here, elsewhere = client_for(app, "ann"), client_for(app, "ann")
    page = here.get("/account")
    assert page.status_code == 200 and 'name="current"' in page.text
    token = field(page.text, "csrf")
    bad = here.post("/account/password", data={"csrf": token, "current": "wrong-password", "new": NEW_PASSWORD,
                                               "again": NEW_PASSWORD})
    assert bad.status_code == 403 and "current password" in bad.text
    assert here.post("/account/password", data={"csrf": token, "current": PASSWORD, "new": NEW_PASSWORD,
                                                "again": "different-pw"}).status_code == 422
    assert here.post("/account/password", data={"current": PASSWORD, "new": NEW_PASSWORD,
                                                "again": NEW_PASSWORD}).status_code == 403  # no token
    ok = here.post("/account/password", data={"csrf": token, "current": PASSWORD, "new": NEW_PASSWORD,
                                              "again": NEW_PASSWORD})
    assert ok.status_code == 200 and "changed" in ok.text
    assert logged_in(here) and not logged_in(elsewhere)
    assert login(client_for(app), "ann").status_code == 401
    assert logged_in(client_for(app, "ann", NEW_PASSWORD))


def test_wrong_current_passwords_count_towards_the_lockout(svc):
    ann = svc.add_user("ann", "annotator", PASSWORD)
    token = svc.create_session(ann.id, 3600)
    session_id = svc.session_user(token)[1]
    for _ in range(5):
        with pytest.raises(Forbidden):
            svc.change_password(ann.id, "wrong-password", NEW_PASSWORD, keep_session=session_id)
    with pytest.raises(AccountLocked):
        svc.change_password(ann.id, PASSWORD, NEW_PASSWORD, keep_session=session_id)


def test_sessions_expire_on_the_server(svc, monkeypatch):
    ann = svc.add_user("ann", "annotator", PASSWORD)
    clock = [1000.0]
    monkeypatch.setattr(service_mod, "now", lambda: clock[0])
    token = svc.create_session(ann.id, 3600)
    assert svc.session_user(token)[0].name == "ann"
    clock[0] += 3601
    assert svc.session_user(token) is None
    assert svc.session_user("") is None and svc.session_user("x" * 10_000) is None


def test_cli_manages_users_passwords_locks_and_sessions(tmp_path, monkeypatch, capsys):
    from rlhfkit import label as cli

    db = str(tmp_path / "f.db")
    run = lambda *argv: cli.main(cli.parse_label_args(list(argv)))  # noqa: E731
    monkeypatch.setenv("RLHFKIT_PASSWORD", PASSWORD)
    run("add-user", "--db", db, "--user", "ann")
    svc = FeedbackService(open_store(db))
    token = svc.create_session(svc.user_by_name("ann").id, 3600)
    for _ in range(5):
        svc.authenticate("ann", "wrong-password")
    (row,) = run("users", "--db", db)
    assert row["user"] == "ann" and row["active"] and row["locked"] and row["sessions"] == 1
    assert run("unlock", "--db", db, "--user", "ann")["unlocked"]
    assert svc.authenticate("ann", PASSWORD).name == "ann"
    assert run("revoke-sessions", "--db", db, "--user", "ann")["sessions_ended"] == 1
    assert svc.session_user(token) is None
    token = svc.create_session(svc.user_by_name("ann").id, 3600)
    run("deactivate", "--db", db, "--user", "ann")
    assert svc.session_user(token) is None
    with pytest.raises(Forbidden, match="deactivated"):
        svc.authenticate("ann", PASSWORD)
    run("reactivate", "--db", db, "--user", "ann")
    monkeypatch.setenv("RLHFKIT_PASSWORD", NEW_PASSWORD)
    run("reset-password", "--db", db, "--user", "ann")
    assert svc.authenticate("ann", PASSWORD) is None and svc.authenticate("ann", NEW_PASSWORD).name == "ann"
    with pytest.raises(ConfigError, match="no user"):
        run("deactivate", "--db", db, "--user", "ghost")


def test_a_database_from_before_sessions_is_migrated_and_its_users_still_log_in(tmp_path):
    from alembic import command
    from sqlalchemy import create_engine

    from rlhfkit.feedback.service import hash_password
    from rlhfkit.feedback.store import _alembic_config, head_revision

    path = tmp_path / "old.db"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0001")  # the schema as the previous release left it
        conn.exec_driver_sql("insert into users (name, role, password_hash, created_at) values (?, ?, ?, 0)",
                             ("ann", "annotator", hash_password(PASSWORD)))
    engine.dispose()
    svc = FeedbackService(open_store(str(path)))
    with svc.store.engine.connect() as conn:
        assert conn.exec_driver_sql("select version_num from alembic_version").scalar() == head_revision() != "0001"
    (account,) = svc.accounts()
    assert account.active and account.sessions == 0
    user = svc.authenticate("ann", PASSWORD)
    assert svc.session_user(svc.create_session(user.id, 60))[0].name == "ann"


# ----------------------------------------------------------------------------------- 7: the database file
def test_the_database_and_its_wal_and_shm_files_are_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "feedback.db"
        store = open_store(str(path))
        svc = FeedbackService(store)
        svc.add_user("ann", "annotator", PASSWORD)  # a write, so the -wal and -shm files exist
        files = [path, tmp_path / "feedback.db-wal", tmp_path / "feedback.db-shm"]
        assert all(f.exists() for f in files)
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        store.close()
        # a database an older rlhfkit left world-readable is made owner-only when opened
        os.chmod(path, 0o644)
        open_store(str(path)).close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


# ------------------------------------------------------------------------- 7: overflow, headers, body limit
def test_integer_overflow_in_paths_and_forms_is_a_400_with_the_security_headers(app):
    ann, boss = client_for(app, "ann"), client_for(app, "boss")
    pid = app.state.ids["pairs"]
    big = str(2**70)
    for c, path in ((ann, f"/p/{big}"), (boss, f"/admin/p/{big}"), (ann, f"/p/-{big}")):
        r = c.get(path, follow_redirects=False)
        assert r.status_code == 400, (path, r.status_code)
        assert_secure_headers(r)
    f = open_form(ann, pid)
    for name, value in (("assignment_id", big), ("time_spent_ms", big), ("assignment_id", f"-{big}")):
        r = ann.post(f"/p/{pid}/submit", data={**f, "outcome": "tie", name: value})
        assert r.status_code == 400, (name, value, r.status_code, r.text[:200])
        assert_secure_headers(r)
        assert "Internal Server Error" not in r.text


def open_form(c, pid):
    page = c.get(f"/p/{pid}").text
    return {k: field(page, k) for k in ("csrf", "assignment_id", "submission_id")}


def judge_twice(c, pid):
    f = open_form(c, pid)
    assert c.post(f"/p/{pid}/submit", data={**f, "outcome": "tie"}, follow_redirects=False).status_code == 303
    return c.post(f"/p/{pid}/submit", data={**f, "outcome": "tie", "submission_id": "another-id-1234"})


def test_every_error_path_carries_the_security_headers(app, svc, monkeypatch):
    ann = client_for(app, "ann")
    pid = app.state.ids["pairs"]
    cases = {
        404: lambda: ann.get("/no/such/page"),
        405: lambda: ann.put("/login"),
        400: lambda: ann.post(f"/p/{pid}/submit", data={"assignment_id": "abc"}),
        413: lambda: client_for(app).post("/login", content=b"a" * (2 * 1024 * 1024),
                                          headers={"content-type": "application/x-www-form-urlencoded"}),
        403: lambda: ann.get(f"/admin/p/{pid}"),
        409: lambda: judge_twice(ann, pid),
        422: lambda: ann.post(f"/p/{pid}/submit", data={**open_form(ann, pid), "outcome": "evil"}),
    }
    for status, call in cases.items():
        r = call()
        assert r.status_code == status, (status, r.status_code, r.text[:200])
        assert_secure_headers(r)
    monkeypatch.setattr(svc, "projects", lambda: 1 / 0)  # an unhandled exception deep in a page
    r = ann.get("/")
    assert r.status_code == 500 and "Traceback" not in r.text and "ZeroDivision" not in r.text
    assert_secure_headers(r)


def test_request_bodies_over_the_limit_are_refused_before_they_are_read(svc, tmp_path):
    populate(svc)
    app = create_app(svc, load_or_create_secret(tmp_path / "k"), max_body_bytes=64 * 1024)
    c = TestClient(app, base_url="http://127.0.0.1")
    page = c.get("/login")
    form = {"name": "ann", "password": PASSWORD, "csrf": field(page.text, "csrf")}
    huge = {**form, "password": "x" * (100 * 1024)}
    r = c.post("/login", data=huge)
    assert r.status_code == 413
    assert_secure_headers(r)

    def chunks():  # no Content-Length: the limit counts the bytes as they arrive
        for _ in range(100):
            yield b"a" * 1024

    r = c.post("/login", content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413
    assert login(c, "ann").status_code == 303  # a normal form still fits


def test_secure_cookies_flag_marks_every_cookie_secure(svc, tmp_path):
    populate(svc)
    app = create_app(svc, load_or_create_secret(tmp_path / "k"), secure_cookies=True)
    c = TestClient(app, base_url="https://127.0.0.1")
    page = c.get("/login")
    assert "secure" in page.headers["set-cookie"].lower()
    r = login(c, "ann")
    assert r.status_code == 303 and "; secure" in r.headers["set-cookie"].lower()


def test_serve_flags_reach_the_server(monkeypatch, tmp_path):
    from rlhfkit import label as cli
    from rlhfkit.feedback.web import app as app_mod

    seen = {}
    monkeypatch.setattr(app_mod, "run_server", lambda db, **kw: seen.update(kw))
    cfg = cli.parse_label_args(["serve", "--db", str(tmp_path / "f.db"), "--secure-cookies", "--trusted-proxy",
                                "10.0.0.5,192.168.0.0/24", "--max-body-bytes", "200000"])
    cli.main(cfg)
    assert seen["secure_cookies"] is True and seen["trusted_proxies"] == ["10.0.0.5", "192.168.0.0/24"]
    assert seen["max_body_bytes"] == 200000
    defaults = cli.parse_label_args(["serve"])
    assert defaults.trusted_proxy == [] and defaults.secure_cookies is False
    for bad, match in ((["--trusted-proxy", "*"], "trusted-proxy"), (["--trusted-proxy", "proxy.example"],
                       "trusted-proxy"), (["--max-body-bytes", "10"], "max-body-bytes")):
        with pytest.raises(ConfigError, match=match):
            cli.main(cli.parse_label_args(["serve", "--db", str(tmp_path / "f.db"), *bad]))


def test_uvicorn_trusts_forwarded_headers_only_from_named_proxies():
    from rlhfkit.feedback.web.app import uvicorn_options

    assert uvicorn_options([])["proxy_headers"] is False
    named = uvicorn_options(["10.0.0.5", "192.168.0.0/24"])
    assert named["proxy_headers"] is True and named["forwarded_allow_ips"] == ["10.0.0.5", "192.168.0.0/24"]


def test_a_secret_file_that_is_not_hex_and_a_db_that_is_not_sqlite_are_one_line_errors(tmp_path):
    import os

    from rlhfkit.errors import UserError
    from rlhfkit.feedback.store import open_store
    from rlhfkit.feedback.web.app import load_or_create_secret

    secret = tmp_path / "secret"
    secret.write_text("not hex at all")
    os.chmod(secret, 0o600)
    with pytest.raises(UserError, match="does not hold a hex key"):
        load_or_create_secret(secret)
    notdb = tmp_path / "notes.txt"
    notdb.write_text("this is a text file, not a database\n" * 200)
    with pytest.raises(UserError, match="not a usable feedback database"):
        open_store(str(notdb))
