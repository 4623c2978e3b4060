"""Building a populated labelling app for the web tests."""

import re

from rlhfkit.feedback.service import FeedbackService, ItemSpec

XSS = [
    "<script>alert('xss')</script>",
    "<img src=x onerror=\"alert(1)\">",
    "\"><svg/onload=alert(document.domain)>",
    "javascript:alert(1)",
    "<iframe srcdoc=\"<script>parent.alert(1)</script>\"></iframe>",
    "{{ 7*7 }} {% raw %}",
    "<a href=\"javascript:alert(1)\">click</a><style>body{display:none}</style>",
]
SQLI = ["'; DROP TABLE judgments; --", "\" OR 1=1 --", "Robert'); DELETE FROM users WHERE ('1'='1",
        "1; UPDATE users SET role='admin'"]
PASSWORD = "long-enough-pw"
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer",
                    "cache-control": "no-store"}
"""Headers every response of the labelling app carries, error pages included (and its Content-Security-Policy)."""


def populate(svc: FeedbackService, n_pairs: int = 6) -> dict:
    svc.add_user("boss", "admin", PASSWORD)
    svc.add_user("ann", "annotator", PASSWORD)
    svc.add_user("bob", "annotator", PASSWORD)
    pairs = svc.create_project("pairs", instructions="Pick the more helpful answer. <b>not bold</b>",
                               annotators_per_item=2)
    items = [ItemSpec(f"what is {i} plus 1 ? {XSS[i % len(XSS)]}",
                      [f"{i} plus 1 is {i + 1} . {SQLI[i % len(SQLI)]}", f"{i} plus 1 is {i + 3} . {XSS[(i + 1) % len(XSS)]}"],
                      ["good", "bad"]) for i in range(n_pairs)]
    svc.add_items(pairs.id, items)
    ranks = svc.create_project("ranks", mode="ranking", responses_per_item=3)
    svc.add_items(ranks.id, [ItemSpec("say hi to ada .", ["hi ada !", "hello .", "go away ."], ["m1", "m2", "m3"]),
                             ItemSpec("say hi to bo .", ["hi bo !", "hey .", "no ."], ["m1", "m2", "m3"])])
    return {"pairs": pairs.id, "ranks": ranks.id}


def field(html: str, name: str) -> str:
    m = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert m, f"no {name} field in the page"
    return m.group(1)


def login(client, name: str, password: str = PASSWORD):
    page = client.get("/login")
    return client.post("/login", data={"name": name, "password": password, "csrf": field(page.text, "csrf")},
                       follow_redirects=False)


def wait_until_serving(base: str, server, seconds: float = 60) -> None:
    """Poll base/login until the server answers 200; fail if it exits or takes longer than `seconds`."""
    import time

    import httpx

    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(base + "/login", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.time() < deadline and server.poll() is None, "the server did not start"
        time.sleep(0.2)


def assert_secure_headers(r) -> None:
    """r carries the app's security headers (a strict CSP and the rest of SECURITY_HEADERS)."""
    where = f"{r.request.method} {str(r.request.url)[:80]} -> {r.status_code}"
    csp = r.headers.get("content-security-policy", "")
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, f"{where}: CSP {csp!r}"
    for name, value in SECURITY_HEADERS.items():
        assert r.headers.get(name) == value, f"{where}: {name} is {r.headers.get(name)!r}"
