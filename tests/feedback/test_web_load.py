"""50 simulated annotators submitting concurrently over HTTP to a real server on localhost: every acknowledged
judgment is stored exactly once (no loss, no duplicates), retries included. Prints throughput and p99."""

import re
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from rlhfkit.feedback.service import FeedbackService  # noqa: E402
from rlhfkit.feedback.store import open_store  # noqa: E402

from .fb_helpers import arith_items  # noqa: E402
from .web_helpers import PASSWORD, field, login, wait_until_serving  # noqa: E402

ANNOTATORS, TASKS_EACH = 50, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fifty_concurrent_annotators_lose_and_duplicate_nothing(tmp_path):
    db = str(tmp_path / "load.db")
    svc = FeedbackService(open_store(db))
    project = svc.create_project("load", annotators_per_item=2)
    svc.add_items(project.id, arith_items(ANNOTATORS * TASKS_EACH))  # slots to spare: nobody runs dry
    for i in range(ANNOTATORS):
        svc.add_user(f"a{i:02d}", "annotator", PASSWORD)
    port = free_port()
    code = (f"from rlhfkit.feedback.web.app import run_server; run_server({db!r}, host='127.0.0.1', port={port}, "
            f"secret_file={str(tmp_path / 'key')!r}, rate_limit=1000)")
    server = subprocess.Popen([sys.executable, "-c", code])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(base, server)

        acked: list[str] = []
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(ANNOTATORS)

        def annotator(i: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as c:
                try:
                    assert login(c, f"a{i:02d}").status_code == 303
                    start.wait()
                    for n in range(TASKS_EACH):
                        page = c.get(f"/p/{project.id}")
                        if "name=\"assignment_id\"" not in page.text:
                            break
                        data = {k: field(page.text, k) for k in ("csrf", "assignment_id", "submission_id")}
                        data.update(outcome=re.search(r'value="([AB])" data-key="1"', page.text).group(1),
                                    strength="better")
                        for attempt in range(2 if n % 2 == 0 else 1):  # every other task is retried
                            t0 = time.perf_counter()
                            r = c.post(f"/p/{project.id}/submit", data=data, follow_redirects=False)
                            with lock:
                                latencies.append(time.perf_counter() - t0)
                            if r.status_code != 303:
                                raise AssertionError(f"status {r.status_code}: {r.text[:200]}")
                        with lock:
                            acked.append(data["submission_id"])
                except Exception as exc:  # noqa: BLE001
                    with lock:
                        errors.append(f"a{i:02d}: {exc!r}")

        threads = [threading.Thread(target=annotator, args=(i,)) for i in range(ANNOTATORS)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert errors == []
    with svc.store.engine.connect() as conn:
        stored = [s for (s,) in conn.exec_driver_sql("select submission_id from judgments")]
    assert len(stored) == len(set(stored))  # no duplicates
    assert sorted(stored) == sorted(acked)  # every acknowledged judgment, nothing else
    assert len(acked) == ANNOTATORS * TASKS_EACH
    latencies.sort()
    p99 = latencies[int(0.99 * (len(latencies) - 1))]
    print(f"\n{len(latencies)} submits ({len(acked)} judgments) from {ANNOTATORS} annotators in {elapsed:.1f} s "
          f"(whole sessions incl. logins and page loads): {len(latencies) / elapsed:.1f} submits/s, "
          f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
