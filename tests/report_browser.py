"""Open a demo report.html in headless Debian Chromium and check what a reader sees: the summary table, every
plot drawn with a real size, and not one request leaving the page (it must open from disk with no network)."""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]


def check_report_in_browser(report: Path, screenshot: Path | None = None) -> dict[str, int]:
    """Returns counts of what rendered; asserts the table, the plots and the absence of outside requests."""
    from playwright.sync_api import sync_playwright

    url = report.resolve().as_uri()
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url, wait_until="load")
            rows = page.locator("table").first.locator("tr").count()
            svgs = page.locator("svg")
            sizes = [svgs.nth(i).bounding_box() for i in range(svgs.count())]
            marks = page.locator("svg path, svg use").count()  # matplotlib: lines, markers, ticks, error bars
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    outside = [u for u in requests if u != url]
    assert not outside, f"the report made requests beyond its own file: {outside}"
    assert rows >= 2, "the summary table has no policy rows"
    assert sizes and all(b is not None and b["width"] > 100 and b["height"] > 100 for b in sizes), sizes
    return {"table_rows": rows, "plots": len(sizes), "marks": marks}
