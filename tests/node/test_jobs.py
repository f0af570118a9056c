"""The node's jobs: every exception ends in a state with a reason, logs carry the cause in both
renderers (never patient data), graceful stop, retention's first run."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from pathlib import Path

import pytest

from screener import config, logs
from screener.node import exc_fields, retention_first_delay
from tests.node.state_helpers import try_send
from tests.node.test_state_machine import Clock, FakeNode, FakeScreener, FakeSender, part10

DX = "1.2.840.10008.5.1.4.1.1.1.1"


def make_node(tmp_path: Path, screener=None, sender=None, clock=None, real_time=False, **schedule) -> FakeNode:
    base = config.Settings()
    sched = dataclasses.replace(
        base.schedule, **{"study_stable_s": 1.0, "send_backoff_s": 1.0, "send_retries": 3, **schedule}
    )
    node_s = dataclasses.replace(base.node, var_dir=str(tmp_path / "var"), port=0, host="127.0.0.1")
    settings = dataclasses.replace(
        base,
        node=node_s,
        schedule=sched,
        destinations=[config.Destination("A", "h", 1)],
        http=dataclasses.replace(base.http, enabled=False),
    )
    clock = clock or Clock()
    return FakeNode(
        settings,
        engines={},
        screener=screener or FakeScreener({}),
        sender=sender or FakeSender(),
        clock=time.time if real_time else clock.time,
        monotonic=time.monotonic if real_time else clock.monotonic,
    )


def receive(node, study: str, sop: str) -> None:
    node.store.store_instance(part10(study, sop), DX, sop, study, study + ".1", "1.2.840.10008.1.2.1", "M", "x")


@pytest.fixture
def json_logs():
    buf = io.StringIO()
    logs.configure("json", "info", stream=buf)
    yield buf
    logs.configure("console", "info")


def events(buf: io.StringIO, name: str) -> list[dict]:
    return [e for e in map(json.loads, buf.getvalue().splitlines()) if e.get("event") == name]


def test_sr_build_failure_of_any_kind_is_terminal_with_a_reason(tmp_path, json_logs):
    """Issue 10 item 3: not only ValueError; instances never stay screened; no library text."""
    node = make_node(tmp_path)
    try:
        receive(node, "1.2.3.1", "1.2.3.1.1")
        node.store.force_complete("1.2.3.1")
        FakeNode.sr_raise_next = True
        try:
            node.screen_batch()
        finally:
            FakeNode.sr_raise_next = False
        study = node.store.get_study("1.2.3.1")
        inst = node.store.get_instance("1.2.3.1.1")
        assert study.state == "failed" and study.reason.startswith("SR could not be built: KeyError")
        assert inst.state == "failed" and inst.reason == study.reason
        assert node.store.check_invariants() == []
        (e,) = events(json_logs, "sr_failed")
        assert e["error_type"] == "KeyError" and e["traceback"]
        assert "PatientID" not in e["error"]  # raised outside the node's package: message withheld
    finally:
        node.store.close()


def test_screening_exception_returns_study_and_quarantines(tmp_path, json_logs):
    class Exploding(FakeScreener):
        def screen(self, paths):
            raise RuntimeError("decoder said Doe^Jane")

    node = make_node(tmp_path, screener=Exploding({}), screen_attempts=2)
    try:
        receive(node, "1.2.3.2", "1.2.3.2.1")
        node.store.force_complete("1.2.3.2")
        node.screen_batch()
        st = node.store.get_study("1.2.3.2")
        assert st.state == "complete" and st.reason == "screening failed (RuntimeError)" and st.screen_attempts == 1
        node.screen_batch()
        st = node.store.get_study("1.2.3.2")
        assert st.state == "failed" and st.reason.startswith("quarantined after 2 screening attempts")
        assert node.store.get_instance("1.2.3.2.1").state == "failed"
        failed = events(json_logs, "job_failed")
        assert failed and all(e["error_type"] == "RuntimeError" and e["traceback"] for e in failed)
        assert "Doe^Jane" not in json_logs.getvalue()
    finally:
        node.store.close()


def test_console_renderer_carries_the_cause_too():
    buf = io.StringIO()
    logs.configure("console", "info", stream=buf)
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:
            logs.get_logger("t").error("job_failed", job="screen", **exc_fields(exc))
    finally:
        logs.configure("console", "info")
    text = buf.getvalue()
    assert "error_type=OSError" in text and "No space left on device" in text and "traceback=" in text


def test_own_exception_message_is_logged():
    from screener.store import Store

    try:
        Store.recover(Store.__new__(Store))  # an unopened store: the node's own error
    except Exception as exc:  # noqa: BLE001
        fields = exc_fields(exc)
    assert fields["error_type"] and fields["traceback"] and "(not logged" not in fields["error"]


def test_unwritable_sr_folder_ends_failed_with_reason(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    node = make_node(tmp_path, send_retries=2)
    node.destinations = [f"folder:{not_a_folder / 'sub'}"]
    try:
        receive(node, "1.2.3.3", "1.2.3.3.1")
        node.store.force_complete("1.2.3.3")
        node.screen_batch()
        for _ in range(3):
            node.send_due()
            node.store._monotonic.__self__.mono += 100  # type: ignore[attr-defined]
        st = node.store.get_study("1.2.3.3")
        assert st.state == "failed" and "writing to sr_folder failed" in st.reason
        assert node.store.check_invariants() == []
    finally:
        node.store.close()


def test_sr_folder_gets_only_the_current_sr(tmp_path):
    folder = tmp_path / "out"
    clock = Clock()
    node = make_node(tmp_path, clock=clock)
    node.destinations = [f"folder:{folder}"]
    try:
        receive(node, "1.2.3.4", "1.2.3.4.1")
        node.store.force_complete("1.2.3.4")
        node.screen_batch()
        node.send_due()
        first = node.store.get_study("1.2.3.4").sr_sop_instance_uid
        assert [p.name for p in folder.iterdir()] == [f"{first}.dcm"]
        receive(node, "1.2.3.4", "1.2.3.4.2")  # late image
        node.store.force_complete("1.2.3.4")
        node.screen_batch()
        node.send_due()
        second = node.store.get_study("1.2.3.4").sr_sop_instance_uid
        assert second != first and [p.name for p in folder.iterdir()] == [f"{second}.dcm"]
    finally:
        node.store.close()


def test_retention_runs_soon_after_start():
    assert retention_first_delay(config.ScheduleSettings()) <= 60
    assert retention_first_delay(dataclasses.replace(config.ScheduleSettings(), retention_interval_s=5)) == 5


class Blocking(FakeScreener):
    def __init__(self) -> None:
        super().__init__({})
        self.entered = threading.Event()
        self.release = threading.Event()

    def screen(self, paths):
        self.entered.set()
        self.release.wait(60)
        return super().screen(paths)


def test_graceful_stop_refuses_first_finishes_the_batch_leaves_the_rest(tmp_path):
    screener = Blocking()
    node = make_node(
        tmp_path, screener=screener, real_time=True, batch_max_size=1, study_stable_s=0.1, batch_interval_s=0.05
    )
    node.start()
    port = node.port
    try:
        assert try_send([], port) == []
        receive(node, "1.2.3.5", "1.2.3.5.1")
        receive(node, "1.2.3.6", "1.2.3.6.1")
        assert screener.entered.wait(30), "no batch started"
        result: list[bool] = []
        stopper = threading.Thread(target=lambda: result.append(node.stop(timeout_s=30)))
        stopper.start()
        deadline = time.monotonic() + 10
        while node.listener is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.listener is None and stopper.is_alive()  # no longer listening, batch still in flight
        from pynetdicom import AE

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = ae.network_timeout = 5
        assoc = ae.associate("127.0.0.1", port, ae_title="CSPINE")
        assert not assoc.is_established  # stopped accepting associations first
        screener.release.set()
        stopper.join(30)
        assert result == [True]
    finally:
        screener.release.set()
        if not node.store.closed:
            node.stop(timeout_s=5)
    from screener.store import Store

    with Store.open(tmp_path / "var", recover=False) as s:
        states = sorted(s.get_study(u).state for u in ("1.2.3.5", "1.2.3.6"))
        # The batch in flight finished; the other study waits for the next start, unscreened.
        assert states[1] == "reported" and states[0] in ("receiving", "complete")
        assert s.check_invariants() == []


def test_stop_is_bounded(tmp_path):
    screener = Blocking()
    node = make_node(tmp_path, screener=screener, real_time=True, study_stable_s=0.1, batch_interval_s=0.05)
    node.start()
    try:
        receive(node, "1.2.3.7", "1.2.3.7.1")
        assert screener.entered.wait(30)
        t0 = time.monotonic()
        assert node.stop(timeout_s=0.5) is False
        assert time.monotonic() - t0 < 5
    finally:
        screener.release.set()
        for t in node._threads:
            t.join(10)
        node.store.close()
