"""A real node with its HTTP side on a free port: `screener demo` sends a study, the counters move,
the health checks answer, and a headless Chromium shows the screened study."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from screener.node import Node
from tests.support.node_helpers import CollectingSCP, node_settings

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def screened(all_engines, tmp_path_factory):
    """A node (all three engines, HTTP on), a test PACS, and the demo study screened and sent."""
    from screener.http import demo

    tmp = tmp_path_factory.mktemp("http-node")
    scp = CollectingSCP().start()
    base = node_settings(tmp / "var", all_engines["dir"], [scp.destination], enabled=("spondylosis", "roi", "stenosis"))
    settings = dataclasses.replace(base, http=dataclasses.replace(base.http, enabled=True, port=0, echo_interval_s=1))
    node = Node(settings)
    node.start()
    try:
        assert node.http is not None
        url = node.http.url.rstrip("/")
        before = httpx.get(f"{url}/metrics").text
        out = io.StringIO()
        result = demo.run(settings, "127.0.0.1", node.port, wait_s=120, out=out)
        scp.wait_for(1)
        deadline = time.time() + 60
        while node.store.get_study(result.study_uid).state != "sent" and time.time() < deadline:
            time.sleep(0.2)
        yield {"node": node, "url": url, "before": before, "demo": result, "out": out.getvalue(), "scp": scp}
    finally:
        node.stop()
        scp.stop()


def test_demo_prints_where_to_look(screened):
    out, result = screened["out"], screened["demo"]
    assert "sent 3 images" in out and "lateral (LL)" in out and "left oblique (LAO)" in out
    assert f"/studies/{result.study_uid}" in out and "screener status" in out
    assert result.sr_file and result.sr_file in out and Path(result.sr_file).is_file()
    assert result.state in ("reported", "sent")


def test_counters_move(screened):
    node, url = screened["node"], screened["url"]
    before = samples(screened["before"])
    after = samples(httpx.get(f"{url}/metrics").text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("screener_instances_received_total") == 3
    assert delta("screener_received_bytes_total") > 0
    assert delta("screener_associations_total") >= 1
    assert delta("screener_batch_images_count") >= 1 and delta("screener_batch_images_sum") == 3
    assert delta("screener_batch_duration_seconds_count") >= 1
    assert delta("screener_screening_latency_seconds_count") == 1
    assert delta("screener_studies_finished_total", state="reported") == 1
    for engine in ("spondylosis", "stenosis"):  # the ROI engine crops for stenosis
        assert delta("screener_engine_inference_seconds_count", engine=engine, backend="onnx-fp32") >= 1, engine
    dest = screened["scp"].destination
    key = f"{dest.ae_title}@{dest.host}:{dest.port}"
    assert delta("screener_send_attempts_total", destination=key, result="ok") == 1
    assert after[("screener_studies", (("state", "sent"),))] == 1
    assert after[("screener_outbox_entries", (("destination", key), ("state", "pending")))] == 0
    assert after[("screener_destination_up", (("destination", key),))] == 1
    assert after[("screener_ready", ())] == 1
    # A refused association is counted by reason.
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="NOT-US")
    assert assoc.is_rejected
    again = samples(httpx.get(f"{url}/metrics").text)
    key2 = ("screener_association_refusals_total", (("reason", "called_ae_title_is_not_ours"),))
    assert again.get(key2, 0.0) - after.get(key2, 0.0) == 1


def test_health_over_http(screened):
    url = screened["url"]
    r = httpx.get(f"{url}/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(f"{url}/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["destinations"]["ok"] is True


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install '.[test]')")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip(f"Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver")
    from selenium.webdriver.chrome.service import Service

    return webdriver, Service


def test_page_in_a_real_browser(screened, tmp_path):
    webdriver, Service = _chrome()
    url, result = screened["url"], screened["demo"]
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--window-size=1280,1000",
        "--hide-scrollbars",
    ):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(30)
        driver.get(url + "/")
        text = driver.find_element("tag name", "body").text
        assert result.study_uid in text
        assert "sent" in text  # the study's state
        assert "spondylosis:" in text and "stenosis:" in text  # its findings
        assert "NOT validated" in text and "demo" in text
        assert "DEMO^SYNTHETIC" not in driver.page_source and "DEMO-0001" not in driver.page_source
        # The whole page in one picture: the window's height is the page's plus the browser's own frame.
        height, frame = driver.execute_script(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
        )
        driver.set_window_size(1280, min(int(height) + int(frame), 4000))
        shot = tmp_path / "status-page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("SCREENER_DOCS_SCREENSHOT"):  # regenerate docs/web-status.png
            shutil.copyfile(shot, os.environ["SCREENER_DOCS_SCREENSHOT"])

        driver.find_element("link text", result.study_uid).click()
        text = driver.find_element("tag name", "body").text
        assert f"Study {result.study_uid}" in text
        rows = driver.find_elements("css selector", "#instances tbody tr")
        assert len(rows) == 3
        assert "spondylosis: present" in text or "spondylosis: absent" in text
        assert "stenosis: present" in text or "stenosis: absent" in text
        assert Path(result.sr_file).name in text  # the SR
        driver.save_screenshot(str(tmp_path / "study-page.png"))

        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], f"console errors: {severe}"
    finally:
        driver.quit()
