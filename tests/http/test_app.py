"""Every endpoint of screener.http.app through Starlette's ASGI test client (no sockets)."""

from __future__ import annotations

import base64
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from screener import config
from screener.http.auth import SESSION_COOKIE, Authenticator
from tests.http.conftest import (
    BIRTH_DATE,
    FAILED,
    PASSWORD,
    PATIENT_ID,
    PATIENT_NAME,
    RECEIVING,
    REPORTED,
    TOKEN,
    USER,
)

PATIENT_VALUES = (PATIENT_NAME, "Doe", "Jane", PATIENT_ID, BIRTH_DATE)


def basic(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def no_patient_data(text: str) -> None:
    for value in PATIENT_VALUES:
        assert value not in text, f"patient data {value!r} leaked"


@pytest.fixture
def auth(credentials):
    return Authenticator.from_settings(config.HttpSettings(**credentials))


# -- health ------------------------------------------------------------------------------------------


def test_healthz(client_for, flags):
    c = client_for()
    r = c.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["version"] == "0.1.0"
    flags.scheduler = False
    r = c.get("/healthz")
    assert r.status_code == 503 and r.json()["status"] == "scheduler stopped"


def test_readyz_ok(client_for):
    r = client_for().get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"listener", "database", "disk", "engines", "destinations"}
    assert all(c["ok"] for c in body["checks"].values())


def test_readyz_listener_down(client_for, flags):
    flags.listener = False
    r = client_for().get("/readyz")
    assert r.status_code == 503
    assert r.json()["checks"]["listener"] == {"ok": False, "detail": "not listening"}


def test_readyz_destination_down_and_switch(client_for):
    r = client_for(echo_ok=False).get("/readyz")
    assert r.status_code == 503
    assert "PACS@127.0.0.1:104" in r.json()["checks"]["destinations"]["detail"]
    # Not checked yet counts as fine; the switch leaves destinations out of the verdict.
    assert client_for(echo_ok=None).get("/readyz").status_code == 200
    r = client_for(echo_ok=False, ready_requires_destinations=False).get("/readyz")
    assert r.status_code == 200 and r.json()["checks"]["destinations"]["ok"] is False


def test_readyz_disk_and_engines(make_view, store):
    from starlette.testclient import TestClient

    from screener.http.app import create_app

    view = make_view()
    view.settings = config.with_overrides(view.settings)  # a copy
    import dataclasses

    view.settings = dataclasses.replace(
        view.settings,
        node=dataclasses.replace(view.settings.node, min_free_mb=10**12),
        engines=dataclasses.replace(view.settings.engines, enabled=["spondylosis", "stenosis"]),
    )
    with TestClient(create_app(view)) as c:
        r = c.get("/readyz")
    checks = r.json()["checks"]
    assert r.status_code == 503
    assert not checks["disk"]["ok"] and "watermark" in checks["disk"]["detail"]
    assert not checks["engines"]["ok"] and "stenosis" in checks["engines"]["detail"]


def test_readyz_database_not_writable(make_view, store):
    import sqlite3

    from starlette.testclient import TestClient

    from screener.http.app import create_app

    view = make_view()
    blocker = sqlite3.connect(store.db_path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the lock past the 2 s timeout
    try:
        with TestClient(create_app(view)) as c:
            r = c.get("/readyz")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert r.status_code == 503 and not r.json()["checks"]["database"]["ok"]


# -- metrics -----------------------------------------------------------------------------------------


def scrape(client) -> dict[str, dict[tuple, float]]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_metrics_state_gauges(client_for, store):
    m = scrape(client_for())
    studies = {dict(k)["state"]: v for k, v in m["screener_studies"].items()}
    assert studies == {k: float(v) for k, v in store.counts()["studies"].items()}
    assert studies["failed"] == 1 and studies["sent"] == 1 and studies["receiving"] == 1
    instances = {dict(k)["state"]: v for k, v in m["screener_instances"].items()}
    assert instances["received"] == 2 and instances["sent"] == 1
    outbox = {(dict(k)["destination"], dict(k)["state"]): v for k, v in m["screener_outbox_entries"].items()}
    assert outbox == {("PACS@127.0.0.1:104", "pending"): 0.0, ("PACS@127.0.0.1:104", "failed"): 1.0}
    assert m["screener_destination_up"] == {(("destination", "PACS@127.0.0.1:104"),): 1.0}
    assert m["screener_ready"][()] == 1.0
    assert m["screener_spool_bytes"][()] > 0 and m["screener_spool_files"][()] == 3
    assert m["screener_disk_free_bytes"][()] > 0 and m["screener_disk_min_free_bytes"][()] == 1024 * 1024
    (labels,) = m["screener_engine_info"]
    assert dict(labels) == {
        "engine": "spondylosis",
        "version": "demo-spondylosis",
        "backend": "onnx-fp32",
        "validated": "false",
        "demo": "true",
    }
    assert dict(next(iter(m["screener_build_info"])))["version"] == "0.1.0"
    # Event counters and histograms exist from the start (zero until something happens).
    for name in (
        "screener_instances_received_total",
        "screener_received_bytes_total",
        "screener_associations_total",
        "screener_batch_images_bucket",
        "screener_batch_duration_seconds_count",
        "screener_screening_latency_seconds_count",
        "process_cpu_seconds_total",
    ):
        assert name in m, name


def test_metrics_names_follow_conventions(client_for):
    r = client_for().get("/metrics")
    for fam in text_string_to_metric_families(r.text):
        if not fam.name.startswith("screener_"):
            continue
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|minutes)(_|$)", fam.name), fam.name
    no_patient_data(r.text)


def test_metric_functions_count(client_for):
    from screener import metrics

    c = client_for()
    before = scrape(c)
    metrics.instance_refused(0xA700)
    metrics.association_refused("calling AE title not allowed")
    metrics.association_rejected(0x02, 0x03, 0x02)
    metrics.job_failed("send")
    metrics.send_attempt("PACS@127.0.0.1:104", ok=False)
    after = scrape(c)

    def delta(name, **labels):
        key = tuple(sorted(labels.items()))
        return after[name].get(key, 0.0) - before.get(name, {}).get(key, 0.0)

    assert delta("screener_instances_refused_total", status="0xA700") == 1
    assert delta("screener_association_refusals_total", reason="calling_ae_title_not_allowed") == 1
    assert delta("screener_association_refusals_total", reason="association_limit") == 1
    assert delta("screener_job_failures_total", job="send") == 1
    assert delta("screener_send_attempts_total", destination="PACS@127.0.0.1:104", result="error") == 1


# -- pages -------------------------------------------------------------------------------------------


def test_index_page(client_for):
    r = client_for().get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    t = r.text
    for uid in (REPORTED, FAILED, RECEIVING):
        assert f'href="/studies/{uid}"' in t
    assert "CSPINE" in t and "0.1.0" in t and "DICOM port 11112" in t
    assert "spondylosis: present (0.91)" in t and "spondylosis: absent (0.10)" in t
    assert "demo-spondylosis" in t and "NOT validated" in t and "demo" in t
    assert "<svg" in t and "images received <b>3</b>" in t and "SRs sent <b>1</b>" in t
    assert "association rejected" in t  # the failure's reason
    assert 'href="/static/style.css"' in t and "<script" not in t and " style=" not in t
    assert "ready" in t
    no_patient_data(t)


def test_index_filter_by_state(client_for):
    t = client_for().get("/?state=failed").text
    assert f'href="/studies/{FAILED}"' in t and f'href="/studies/{REPORTED}"' not in t
    t = client_for().get("/?state=<script>").text  # unknown state: no filter, nothing reflected
    assert "<script>" not in t and f'href="/studies/{REPORTED}"' in t


def test_study_page(client_for):
    r = client_for().get(f"/studies/{REPORTED}")
    assert r.status_code == 200
    t = r.text
    assert REPORTED in t and REPORTED + ".1" in t
    assert "spondylosis: present" in t and "p=0.910" in t and "threshold 0.420" in t
    assert "9.9.9" in t and f"sr/{REPORTED}/9.9.9.dcm" in t
    assert "PACS@127.0.0.1:104" in t and "sent" in t
    assert "Read-only" in t and "<form" not in t
    no_patient_data(t)


def test_study_not_found(client_for):
    c = client_for()
    assert c.get("/studies/1.2.3.4").status_code == 404
    assert c.get("/studies/not-a-uid").status_code == 404
    assert c.get("/nothing-here").status_code == 404


def test_static_and_headers(client_for):
    c = client_for()
    css = c.get("/static/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css") and "body" in css.text
    icon = c.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    r = c.get("/")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    assert "server" not in r.headers or "uvicorn" not in r.headers["server"]


# -- actions and auth --------------------------------------------------------------------------------


def test_actions_read_only_without_credentials(client_for, store):
    c = client_for()
    r = c.post(f"/studies/{FAILED}/resend", data={"csrf": "x"}, headers=basic())
    assert r.status_code == 403
    assert store.get_study(FAILED).state == "failed"
    assert c.get("/login").status_code == 404


def test_login_asks_for_basic(client_for, auth):
    c = client_for(auth=auth)
    r = c.get("/login", follow_redirects=False)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith('Basic realm="cspine-screener"')
    assert c.get("/login", headers=basic(password="wrong"), follow_redirects=False).status_code == 401
    r = c.get("/login", headers=basic(), follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert "signed in as <b>admin</b>" in c.get("/", headers=basic()).text


def csrf_of(page: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert m, "no CSRF token in the page"
    return m.group(1)


def test_resend_with_basic_and_csrf(client_for, auth, store):
    c = client_for(auth=auth)
    page = c.get(f"/studies/{FAILED}", headers=basic())
    assert page.status_code == 200 and SESSION_COOKIE in page.cookies
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    token = csrf_of(page.text)
    # Without the token, with a wrong one, or from another site: refused, nothing changes.
    assert c.post(f"/studies/{FAILED}/resend", headers=basic()).status_code == 403
    assert c.post(f"/studies/{FAILED}/resend", data={"csrf": "0" * 64}, headers=basic()).status_code == 403
    cross = {**basic(), "Sec-Fetch-Site": "cross-site"}
    assert c.post(f"/studies/{FAILED}/resend", data={"csrf": token}, headers=cross).status_code == 403
    # Without credentials: 401 asking for basic auth.
    r = c.post(f"/studies/{FAILED}/resend", data={"csrf": token})
    assert r.status_code == 401 and "www-authenticate" in r.headers
    assert store.get_study(FAILED).state == "failed"
    # Credentials + session cookie + token: done, redirected back with a message.
    r = c.post(f"/studies/{FAILED}/resend", data={"csrf": token}, headers=basic(), follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/studies/{FAILED}?done=resend"
    assert store.get_study(FAILED).state == "reported"
    assert [o.state for o in store.outbox_of(FAILED)] == ["pending"]
    assert "Re-queued" in c.get(r.headers["location"], headers=basic()).text


def test_complete_with_bearer(client_for, auth, store):
    c = client_for(auth=auth)
    assert c.post(f"/studies/{RECEIVING}/complete", headers=bearer("wrong")).status_code == 401
    r = c.post(f"/studies/{RECEIVING}/complete", headers=bearer())
    assert r.status_code == 200 and r.json() == {"study_uid": RECEIVING, "action": "complete", "changed": 1}
    assert store.get_study(RECEIVING).state == "complete"
    r = c.post(f"/studies/{RECEIVING}/complete", headers=bearer())
    assert r.json()["changed"] == 0
    assert c.post(f"/studies/{RECEIVING}/explode", headers=bearer()).status_code == 404
    assert c.post("/studies/1.2.3/resend", headers=bearer()).status_code == 404
    assert c.get(f"/studies/{RECEIVING}/complete").status_code == 405


def test_patient_data_only_when_enabled_and_signed_in(client_for, auth):
    plain = client_for(auth=auth)
    no_patient_data(plain.get(f"/studies/{REPORTED}", headers=basic()).text)  # switch off
    shown = client_for(auth=auth, show_patient_data=True)
    no_patient_data(shown.get(f"/studies/{REPORTED}").text)  # not signed in
    no_patient_data(shown.get("/", headers=basic()).text)  # never on the overview
    t = shown.get(f"/studies/{REPORTED}", headers=basic()).text
    assert PATIENT_NAME in t and PATIENT_ID in t and BIRTH_DATE in t


def test_metrics_pending_outbox(client_for, store):
    store.enqueue(RECEIVING, "PACS@127.0.0.1:104", f"sr/{RECEIVING}/1.dcm")
    m = scrape(client_for())
    key = (("destination", "PACS@127.0.0.1:104"), ("state", "pending"))
    assert m["screener_outbox_entries"][key] == 1
    assert m["screener_outbox_oldest_pending_age_seconds"][(("destination", "PACS@127.0.0.1:104"),)] >= 0
