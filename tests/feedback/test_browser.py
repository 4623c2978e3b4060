"""Playwright driving Debian's Chromium (headless): an annotator logs in and labels pairs and a ranking with the
keyboard, XSS payloads in prompts and responses stay text, and an admin exports a file that trains a reward
model. Needs `apt-get install chromium` (CI does it) and the pip package `playwright` (never `playwright
install`: the system browser is used)."""

import shutil
import subprocess
import sys

import pytest

pytest.importorskip("playwright.sync_api")
import httpx  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from rlhfkit.data.preference import read_preferences  # noqa: E402
from rlhfkit.feedback.service import FeedbackService, ItemSpec  # noqa: E402
from rlhfkit.feedback.store import open_store  # noqa: E402

from .test_web_load import free_port  # noqa: E402
from .web_helpers import PASSWORD, XSS, wait_until_serving  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_keyboard_labelling_and_export_in_a_real_browser(tmp_path, tiny_model):
    db = str(tmp_path / "b.db")
    svc = FeedbackService(open_store(db))
    svc.add_user("ann", "annotator", PASSWORD)
    svc.add_user("boss", "admin", PASSWORD)
    pairs = svc.create_project("pairs")
    prompts = [f"what is {i} plus 2 ? {XSS[i]}" for i in range(4)]
    svc.add_items(pairs.id, [ItemSpec(prompts[i], [f"{i} plus 2 is {i + 2} , ada ! {XSS[i + 1]}",
                                                                        f"{i} plus 2 is {i + 5} ."], ["good", "bad"])
                             for i in range(4)])
    ranks = svc.create_project("ranks", mode="ranking", responses_per_item=3)
    svc.add_items(ranks.id, [ItemSpec("say hi to ada .", ["hi ada !", "hello .", "go away ."])])
    port = free_port()
    code = (f"from rlhfkit.feedback.web.app import run_server; run_server({db!r}, port={port}, "
            f"secret_file={str(tmp_path / 'key')!r})")
    server = subprocess.Popen([sys.executable, "-c", code])
    base = f"http://127.0.0.1:{port}"
    dialogs: list[str] = []
    try:
        wait_until_serving(base, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_context(accept_downloads=True).new_page()
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))

            def log_in(name):
                page.goto(base + "/login")
                page.fill("#name", name)
                page.fill("#password", PASSWORD)
                page.click("#login")
                page.wait_for_load_state()

            log_in("ann")
            page.goto(f"{base}/p/{pairs.id}")
            for n in range(4):
                assert page.inner_text("#prompt") == prompts[n]  # the payload is shown as text, verbatim
                assert page.evaluate("window.__xss === undefined && document.querySelectorAll('img, svg, iframe').length") == 0
                page.keyboard.press("1")  # no strength yet: the page asks for one instead of submitting
                assert page.is_visible("#hint")
                page.keyboard.press("c")  # strength: better
                with page.expect_navigation():
                    page.keyboard.press("1" if n % 2 == 0 else "2")
            assert page.is_visible("#done")
            page.goto(f"{base}/p/{ranks.id}")
            page.keyboard.press("2")
            page.keyboard.press("3")
            page.keyboard.press("1")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert page.is_visible("#done")

            # the password page and the logout button work under the CSP, and logout ends the session for good
            page.click("#account-link")
            for box in ("#current", "#new", "#again"):
                page.fill(box, PASSWORD if box == "#current" else "a-new-long-pw")
            with page.expect_navigation():
                page.click("#change")
            assert "changed" in page.inner_text("#message")
            (cookie,) = [c["value"] for c in page.context.cookies() if c["name"] == "rlhfkit_session"]
            with page.expect_navigation():
                page.click("#logout")
            assert page.url.endswith("/login")
            kept = httpx.get(base + "/", headers={"cookie": f"rlhfkit_session={cookie}"}, follow_redirects=False)
            assert kept.status_code == 303

            page.context.clear_cookies()
            log_in("boss")
            page.goto(f"{base}/admin/p/{pairs.id}")
            with page.expect_download() as info:
                page.click("#export-pairs")
            exported = tmp_path / "export.jsonl"
            info.value.save_as(exported)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert dialogs == []
    judged = svc.judged_items(pairs.id)
    assert len(judged) == 4 and all(j["strength"] == "better" for j in judged)
    # the key pressed picked the response shown on that side
    for n, j in enumerate(judged):
        assert j["outcome"] == "AB"[j["display_order"][0 if n % 2 == 0 else 1]]
    (rank,) = svc.judged_items(ranks.id)
    shown = rank["display_order"]
    assert rank["ranking"] == [[shown[1]], [shown[2]], [shown[0]]]
    rows = read_preferences(str(exported))
    assert len(rows) == 4 and all(r.annotator == "ann" for r in rows) and XSS[1] in "".join(r.prompt for r in rows)

    from rlhfkit.reward import train as rtrain

    out = tmp_path / "rm"
    rtrain.main(rtrain.RewardConfig(model=str(tiny_model), data=str(exported), output_dir=str(out), max_steps=2,
                                    batch_size=2, report_to=["jsonl"], progress=False, eval_fraction=0.0))
    assert (out / "config.json").is_file()
