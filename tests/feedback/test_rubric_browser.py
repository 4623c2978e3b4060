"""Playwright driving Debian's Chromium (headless): an annotator labels rubric items criterion by criterion and
scores responses attribute by attribute with the keyboard only, an admin sees the per-criterion agreement and
downloads one criterion's file, and the per-criterion files `label export --by-criterion` writes are read by the
reward trainer's preference reader. Needs `apt-get install chromium` and the pip package `playwright`."""

import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import sync_playwright  # noqa: E402

from rlhfkit.data.preference import read_preferences  # noqa: E402
from rlhfkit.feedback.service import FeedbackService, ItemSpec  # noqa: E402
from rlhfkit.feedback.store import HELPSTEER2_ATTRIBUTES, open_store  # noqa: E402

from .test_web_load import free_port  # noqa: E402
from .web_helpers import PASSWORD, XSS, wait_until_serving  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
HHH = ("helpfulness", "harmlessness", "honesty")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (apt-get install chromium)")
def test_rubric_and_attribute_labelling_with_the_keyboard_then_per_criterion_export(tmp_path):
    from rlhfkit import label as cli

    db = str(tmp_path / "b.db")
    svc = FeedbackService(open_store(db))
    svc.add_user("ann", "annotator", PASSWORD)
    svc.add_user("boss", "admin", PASSWORD)
    rubric = svc.create_project("hhh", criteria=list(HHH))
    prompts = [f"how do i pick a lock ? {XSS[i]}" for i in range(3)]
    svc.add_items(rubric.id, [ItemSpec(prompts[i], [f"{i} : ask a locksmith . {XSS[i + 1]}", f"{i} : use a pin ."],
                                       ["careful", "reckless"]) for i in range(3)])
    scored = svc.create_project("hs", mode="attributes")
    svc.add_items(scored.id, [ItemSpec("name a colour .", ["red .", "the colour red , which is a colour ."],
                                       ["m1", "m2"])])
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

            def current_row() -> str:
                return page.get_attribute("tr.cell.current", "id")

            log_in("ann")
            page.goto(f"{base}/p/{rubric.id}")
            assert "3" in page.inner_text("#keys") and "both bad" in page.inner_text("#keys")
            # item 0: strength c then 1 (left, better); t (tie); 2 (right, no strength)
            assert page.inner_text("#prompt") == prompts[0]
            assert page.evaluate("document.querySelectorAll('img, svg, iframe').length") == 0
            assert current_row() == "criterion-helpfulness"
            page.keyboard.press("Enter")  # nothing answered: the page names what is missing instead of submitting
            assert page.is_visible("#hint") and "helpfulness, harmlessness, honesty" in page.inner_text("#hint")
            page.keyboard.press("c")
            page.keyboard.press("1")
            assert current_row() == "criterion-harmlessness"
            page.keyboard.press("t")
            page.keyboard.press("Enter")
            assert "honesty" in page.inner_text("#hint") and current_row() == "criterion-honesty"
            page.keyboard.press("2")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            # item 1: 2, 4 (both bad), x then 1; then back up to harmlessness and make it a tie (3)
            assert page.inner_text("#prompt") == prompts[1]
            for key in ("2", "4", "x", "1"):
                page.keyboard.press(key)
            page.keyboard.press("ArrowUp")
            assert current_row() == "criterion-harmlessness"
            page.keyboard.press("3")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            # item 2: v then 1 three times: left is significantly better on every criterion
            assert page.inner_text("#prompt") == prompts[2]
            for _ in HHH:
                page.keyboard.press("v")
                page.keyboard.press("1")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert page.is_visible("#done")

            # the attribute page: digits 0-4 score row by row, response 1's five attributes, then response 2's
            page.goto(f"{base}/p/{scored.id}")
            assert current_row() == "score-1-helpfulness"
            for key in ("4", "3", "9", "4", "1"):  # 9 is no score: nothing happens
                page.keyboard.press(key)
            assert current_row() == "score-1-verbosity"
            page.keyboard.press("Enter")
            assert "response 1: verbosity" in page.inner_text("#hint")
            for key in ("0", "2", "2", "3", "1", "4"):
                page.keyboard.press(key)
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert page.is_visible("#done")

            page.context.clear_cookies()
            log_in("boss")
            page.goto(f"{base}/admin/p/{rubric.id}")
            assert "helpfulness, harmlessness, honesty" in page.inner_text("#criteria")
            assert page.locator("#agreement tr[data-criterion]").count() == 3
            with page.expect_download() as info:
                page.click("#export-helpfulness")
            downloaded = tmp_path / "helpfulness-download.jsonl"
            info.value.save_as(downloaded)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert dialogs == []

    judged = svc.judged_items(rubric.id)
    assert len(judged) == 3
    left = ["AB"[j["display_order"][0]] for j in judged]  # what the left response is called in the item
    right = ["AB"[j["display_order"][1]] for j in judged]
    assert judged[0]["rubric"] == {"helpfulness": {"outcome": left[0], "strength": "better"},
                                   "harmlessness": {"outcome": "tie", "strength": None},
                                   "honesty": {"outcome": right[0], "strength": None}}
    assert judged[1]["rubric"] == {"helpfulness": {"outcome": right[1], "strength": None},
                                   "harmlessness": {"outcome": "tie", "strength": None},
                                   "honesty": {"outcome": left[1], "strength": "slightly_better"}}
    assert judged[2]["rubric"] == {c: {"outcome": left[2], "strength": "significantly_better"} for c in HHH}
    (scores,) = svc.judged_items(scored.id)
    first, second = scores["display_order"]
    assert scores["scores"][first] == dict(zip(HELPSTEER2_ATTRIBUTES, (4, 3, 4, 1, 0)))
    assert scores["scores"][second] == dict(zip(HELPSTEER2_ATTRIBUTES, (2, 2, 3, 1, 4)))

    # the export the README shows, read back by the reward trainer's reader
    out = tmp_path / "prefs.jsonl"
    summary = cli.main(cli.parse_label_args(["export", "--db", db, "--project", "hhh", "--output", str(out),
                                             "--by-criterion"]))
    assert summary["rows"] == {"helpfulness": 3, "harmlessness": 1, "honesty": 3}
    assert summary["left_out"] == {"tie": 2}
    for criterion in HHH:
        path = tmp_path / f"prefs.{criterion}.jsonl"
        back = read_preferences(str(path))
        assert len(back) == summary["rows"][criterion]
        want = [j["responses"][0 if j["rubric"][criterion]["outcome"] == "A" else 1] for j in judged
                if j["rubric"][criterion]["outcome"] in ("A", "B")]
        assert [b.chosen for b in back] == want
    pairs = lambda path: [(p.prompt, p.chosen, p.rejected, p.margin) for p in read_preferences(str(path))]  # noqa: E731
    assert pairs(downloaded) == pairs(tmp_path / "prefs.helpfulness.jsonl")  # the admin page's download is the same
    hs = cli.main(cli.parse_label_args(["export", "--db", db, "--project", "hs", "--output",
                                        str(tmp_path / "hs.jsonl")]))
    rows = [json.loads(line) for line in (tmp_path / "hs.jsonl").read_text().splitlines()]
    assert hs["rows"] == 2 and [r["response"] for r in rows] == ["red .", "the colour red , which is a colour ."]
