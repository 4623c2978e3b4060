"""`rlhfkit rounds` with labellers people, end to end in a real browser: while the loop waits on the store, a
person logs in to `rlhfkit label serve` (headless Debian Chromium through Playwright), opens the round's project
once the loop has made it and labels its items with the keyboard; an admin sees the run, the round and its
progress; the loop then goes on by itself to the export and the reward fit. Needs `apt-get install chromium` and
the pip package `playwright` (never `playwright install`: the system browser is used)."""

import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

pytest.importorskip("sqlalchemy", reason="rounds need the `web` extra: pip install -e '.[web]'")
pytest.importorskip("playwright.sync_api")
from playwright.sync_api import sync_playwright  # noqa: E402

from rlhfkit.data.preference import read_preferences  # noqa: E402

from .feedback.test_web_load import free_port  # noqa: E402
from .feedback.web_helpers import PASSWORD, wait_until_serving  # noqa: E402
from .test_rounds import make, world  # noqa: E402,F401  (world: the tiny playground fixture)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
BUDGET = 4


@pytest.fixture(autouse=True)
def fast_hashing(monkeypatch):
    """As in tests/feedback: cheap scrypt for the test's accounts (each hash stores its parameters, so the server
    checks them as made)."""
    from rlhfkit.feedback import service

    monkeypatch.setattr(service, "SCRYPT_N", 2**10)


def _wait(what: str, ok, seconds: float = 60.0, every: float = 0.2):
    deadline = time.time() + seconds
    while not (got := ok()):
        assert time.time() < deadline, f"waited {seconds:.0f} s for {what}"
        time.sleep(every)
    return got


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not shutil.which("chromium"),
                    reason="Debian's chromium is not installed (apt-get install chromium)")
def test_a_person_labels_the_round_in_the_browser_while_the_loop_waits(world, tmp_path):  # noqa: F811
    from rlhfkit.feedback.service import FeedbackService
    from rlhfkit.feedback.store import open_store
    from rlhfkit.rounds import main, round_project_name

    out = tmp_path / "web"
    out.mkdir()
    cfg = make(world, out, rounds=1, policy="none", eval_prompts="", labellers=["people"], poll_seconds=0.2,
               labels_per_round=BUDGET, overlap_share=0.0)
    db, name = cfg.db_path(), round_project_name(cfg, 1)
    assert name == "web-round-1"  # the run is named after the output directory
    svc = FeedbackService(open_store(db))
    svc.add_user("ann", "annotator", PASSWORD)
    svc.add_user("boss", "admin", PASSWORD)

    result: dict = {}

    def loop() -> None:
        try:
            result["summary"] = main(cfg)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            result["error"] = exc

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "rlhfkit", "label", "serve", "--db", db, "--port", str(port),
                               "--secret-file", str(tmp_path / "key")])
    base = f"http://127.0.0.1:{port}"
    dialogs: list[str] = []
    shown: list[tuple[str, str, str]] = []
    try:
        wait_until_serving(base, server)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)

            def logged_in(user: str):
                page = browser.new_context().new_page()
                page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                page.goto(base + "/login")
                page.fill("#name", user)
                page.fill("#password", PASSWORD)
                page.click("#login")
                page.wait_for_load_state()
                return page

            ann, boss = logged_in("ann"), logged_in("boss")

            def round_link():
                """The round's project on the annotator's list, once it has items left for them."""
                assert "error" not in result, result.get("error")
                ann.goto(base + "/")
                row = ann.locator("tr", has=ann.get_by_role("link", name=name, exact=True))
                return row.count() == 1 and row.locator("td").nth(3).inner_text() != "0" and row

            row = _wait("the loop to create the round's project", round_link, every=0.5)
            with ann.expect_navigation():
                row.get_by_role("link").click()
            candidates = [json.loads(x) for x in (out / "round-1" / "candidates.jsonl").read_text().splitlines()]
            responses = {c["prompt"]: c["responses"] for c in candidates}

            def label(n: int) -> None:
                prompt = ann.inner_text("#prompt")
                left, right = ann.locator(".response-text").all_inner_texts()
                # the page shows one of the round's candidate pairs: the user text and two of its samples
                assert prompt in responses and {left, right} <= set(responses[prompt]), (prompt, left, right)
                shown.append((prompt, left, right))
                ann.keyboard.press("c")  # strength: better
                with ann.expect_navigation():
                    ann.keyboard.press("1" if n % 2 == 0 else "2")

            for n in range(BUDGET // 2):
                label(n)
            # half the budget in: the loop is still waiting, and the admin pages say where the round stands
            time.sleep(3 * cfg.poll_seconds)
            assert thread.is_alive() and "error" not in result
            done = json.loads((out / "state.json").read_text())["done"]["1"]
            assert done == ["sample", "items"]
            boss.goto(base + "/admin")
            assert boss.locator("h2.run[data-run='web']").inner_text() == "Run web"
            cells = boss.locator("table.rounds[data-run='web'] tr", has=boss.get_by_role("link", name=name))
            assert cells.locator("td").nth(0).inner_text() == "1"
            assert cells.locator("td").nth(5).inner_text().startswith(f"{BUDGET // 2} of ")
            with boss.expect_navigation():
                cells.get_by_role("link").click()
            progress = boss.inner_text("#round")
            assert progress.startswith(f"Run web · round 1: {BUDGET // 2} label(s) so far on "), progress

            for n in range(BUDGET // 2, BUDGET):
                label(n)
            thread.join(120)
            assert not thread.is_alive(), "the loop did not go on after the round's budget was labelled"
            boss.reload()
            assert boss.inner_text("#round").startswith(f"Run web · round 1: {BUDGET} label(s) so far on ")
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    if "error" in result:
        raise result["error"]
    assert dialogs == []

    (r,) = result["summary"]["rounds"]
    assert r["labels"]["labels"] == BUDGET and r["labels"]["skips"] == 0
    assert r["export"]["rows"] == BUDGET and r["reward"]["rows"] == BUDGET
    assert (out / "round-1" / "reward" / "summary.json").is_file()
    assert json.loads((out / "state.json").read_text())["done"]["1"] == ["sample", "items", "labels", "export",
                                                                         "reward"]
    # what was stored is what the person saw and pressed: key 1 picks the left response, 2 the right
    judged = sorted(svc.judged_items(svc.project(name).id), key=lambda j: j["judgment_id"])  # in the order given
    assert len(judged) == BUDGET and all(j["annotator"] == "ann" and j["strength"] == "better" for j in judged)
    for n, j in enumerate(judged):
        left, right = (j["responses"][i] for i in j["display_order"])
        assert (j["prompt"], left, right) == shown[n]
        assert j["outcome"] == "AB"[j["display_order"][0 if n % 2 == 0 else 1]]
    counted = {o: k for o, k in r["labels"]["outcomes"].items() if k}
    assert counted == dict(Counter(j["outcome"] for j in judged))
    # the exported rows the reward model trained on are those judgments, chosen as pressed
    rows = read_preferences(str(out / "round-1" / "preferences.jsonl"))
    picked = {(p, left if n % 2 == 0 else right) for n, (p, left, right) in enumerate(shown)}
    assert all(row.annotator == "ann" for row in rows)
    assert {(row.prompt[-1]["content"], row.chosen[-1]["content"]) for row in rows} == picked
