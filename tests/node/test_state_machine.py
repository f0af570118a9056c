"""Randomized state-machine test (hypothesis RuleBasedStateMachine) of the store and the node's jobs.

The node's job functions run directly (no threads, no network) with a fake screener, a fake SR
builder (JSON instead of highdicom, same UID rule: derived from content and predecessors) and a
fake sender with two destinations. Rules: receive (new, repeat, late), complete, screen (ok, the
screener raising, the SR builder raising), send (ok, failing, ok but recording it failing), clock
steps (node clock and a wall clock stepped back), crash at a named point in the middle of a job
(the Store is abandoned and reopened from disk: recovery), restart, retention, resend. After every
step the store's invariants hold and nothing acknowledged is lost; at the end, with healthy peers,
everything drains and the last SR delivered for each study to each destination is its current SR
and reports every acknowledged instance (or the instance is failed/skipped with a reason).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from screener import config
from screener.dicom.sr import derive_uid
from screener.node import Node
from screener.screening import EngineResult, ImageOutcome
from screener.store import SRInfo, crash
from tests.support.dicom_factory import make_dx

DESTS = [config.Destination("A", "127.0.0.1", 1), config.Destination("B", "127.0.0.1", 2)]
STABLE_S = 5.0
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
IN_PROCESS_POINTS = {
    "receive": ["store.before_instance_commit", "store.after_instance_commit"],
    "screen": ["node.after_pick", "node.after_screen", "node.after_sr_file", "node.after_finish"],
    "send": ["node.after_claim", "node.after_cstore", "node.after_mark_sent"],
    "retention": ["store.after_retention_commit"],
}


class SimulatedCrash(BaseException):
    """Raised at a crash point: the job is abandoned where it stands (like a kill -9)."""


class Clock:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


class FakeScreener:
    """screen(paths): one outcome per path; the kind of each image decides screened/skipped/failed."""

    def __init__(self, kinds: dict[str, str]) -> None:
        self.kinds = kinds
        self.raise_next = False

    def screen(self, paths):
        if self.raise_next:
            self.raise_next = False
            raise RuntimeError("engine blew up")
        outs = []
        for p in paths:
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            out = ImageOutcome(Path(p), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), header=ds)
            kind = self.kinds.get(out.sop_instance_uid, "ok")
            if kind == "skip":
                out.skipped = "no routing rule matches"
            elif kind == "fail":
                out.failed = "pixel data cannot be decoded"
            else:
                out.results.append(EngineResult("spondylosis", "1.0", "onnx-fp32", 0.7, True, 0.5, None, 0.01))
            outs.append(out)
        return outs


class FakeNode(Node):
    """The node with a JSON SR (fast) built under the same rules as the real one."""

    sr_raise_next = False

    def build_sr(self, screened, predecessors, number):
        if FakeNode.sr_raise_next:
            FakeNode.sr_raise_next = False
            raise KeyError("PatientID")
        study = screened[0].study_uid
        sources = sorted(o.sop_instance_uid for o in screened)
        preds = [p.sop_instance_uid for p in predecessors]
        uid = derive_uid("fake-sr", study, *sources, "|", *preds)
        body = {"uid": uid, "study": study, "sources": sources, "predecessors": preds, "number": number}
        return SRInfo(uid, study + ".9", SR_CLASS, number, ""), json.dumps(body).encode()


class FakeSender:
    def __init__(self) -> None:
        self.up = True
        self.delivered: list[tuple[str, dict]] = []  # (destination, SR body)

    def __call__(self, path, destination, calling_aet, timeout_s=30.0, **_kw):
        if not self.up:
            return False, "association to peer rejected"
        self.delivered.append((destination, json.loads(Path(path).read_bytes())))
        return True, ""


def part10(study_uid: str, sop_uid: str) -> bytes:
    ds = make_dx(np.zeros((4, 4), np.uint8), {"StudyInstanceUID": study_uid}, "LL", sop_uid=sop_uid)
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class NodeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp: Path | None = None

    @initialize(tmp=st.just(None))
    def setup(self, tmp) -> None:
        import tempfile

        self._tmpdir = tempfile.TemporaryDirectory()
        self.tmp = Path(self._tmpdir.name)
        self.clock = Clock()
        self.kinds: dict[str, str] = {}
        self.screener = FakeScreener(self.kinds)
        self.sender = FakeSender()
        base = config.Settings()
        sched = dataclasses.replace(
            base.schedule,
            study_stable_s=STABLE_S,
            send_backoff_s=2.0,
            send_retries=4,
            screen_attempts=3,
            screen_retry_s=3.0,
            retention_days=1,
        )
        node = dataclasses.replace(base.node, var_dir=str(self.tmp / "var"))
        self.settings = dataclasses.replace(base, node=node, schedule=sched, destinations=list(DESTS))
        self.studies = [pydicom.uid.generate_uid() for _ in range(3)]
        self.acked: dict[str, str] = {}  # sop -> study
        self.purged: set[str] = set()
        self.node = self._open()

    def _open(self) -> Node:
        return FakeNode(
            self.settings,
            engines={},
            screener=self.screener,
            sender=self.sender,
            clock=self.clock.time,
            monotonic=self.clock.monotonic,
        )

    def teardown(self) -> None:
        try:
            if self.tmp is not None and not self.node.store.closed:
                self._drain_and_check()
        finally:
            crash.set_handler(None)
            if self.tmp is not None:
                self.node.store.close()
                self._tmpdir.cleanup()

    # -- helpers -----------------------------------------------------------------------------------

    def _crash_at(self, point: str):
        def handler(name: str) -> None:
            if name == point:
                raise SimulatedCrash(name)

        crash.set_handler(handler)

    def _abandon_and_reopen(self) -> None:
        """The process died: nothing of its memory survives; a new one opens the store (recovery)."""
        crash.set_handler(None)
        self.node.store.close()  # only releases the connection and the lock, as the kernel would
        self.node = self._open()

    def _store(self, sop: str, study: str) -> None:
        try:
            self.node.store.store_instance(
                part10(study, sop),
                "1.2.840.10008.5.1.4.1.1.1.1",
                sop,
                study,
                study + ".1",
                "1.2.840.10008.1.2.1",
                "M",
                "x",
            )
        except SimulatedCrash:
            raise
        self.acked[sop] = study

    # -- rules -------------------------------------------------------------------------------------

    @rule(study=st.integers(0, 2), kind=st.sampled_from(["ok", "ok", "ok", "skip", "fail"]))
    def receive(self, study, kind) -> None:
        sop = pydicom.uid.generate_uid()
        self.kinds[sop] = kind
        self._store(sop, self.studies[study])

    @precondition(lambda self: self.acked)
    @rule(data=st.data())
    def repeat(self, data) -> None:
        sop = data.draw(st.sampled_from(sorted(self.acked)))
        if sop in self.purged:
            return
        self._store(sop, self.acked[sop])

    @rule(study=st.integers(0, 2))
    def late_instance(self, study) -> None:
        """A new instance for a study however far it got (reported, on the wire, sent)."""
        sop = pydicom.uid.generate_uid()
        self.kinds[sop] = "ok"
        self._store(sop, self.studies[study])

    @rule(seconds=st.sampled_from([0.5, STABLE_S + 0.1, 60.0]))
    def advance(self, seconds) -> None:
        self.clock.mono += seconds
        self.clock.wall += seconds

    @rule()
    def wall_clock_steps_back(self) -> None:
        self.clock.wall -= 3600.0  # deadlines are on the node clock: nothing stalls

    @rule()
    def complete(self) -> None:
        self.clock.mono += STABLE_S + 0.1
        self.node.store.complete_studies(STABLE_S)

    @rule()
    def screen(self) -> None:
        self.node.tick()

    @rule()
    def screen_raises(self) -> None:
        self.screener.raise_next = True
        self.node.screen_batch()
        self.screener.raise_next = False

    @rule()
    def sr_build_raises(self) -> None:
        FakeNode.sr_raise_next = True
        self.node.screen_batch()
        FakeNode.sr_raise_next = False

    @rule()
    def send_ok(self) -> None:
        self.sender.up = True
        self.node.send_due()

    @rule()
    def send_fail(self) -> None:
        self.sender.up = False
        self.node.send_due()
        self.sender.up = True

    @rule()
    def send_ok_but_recording_fails(self) -> None:
        """The C-STORE succeeds, recording it does not (disk full): no re-send before the backoff."""
        store = self.node.store
        real = store.mark_sent

        def broken(outbox_id):
            raise sqlite3.OperationalError("database or disk is full")

        store.mark_sent = broken  # type: ignore[method-assign]
        try:
            before = len(self.sender.delivered)
            self.node.send_due()
            first = len(self.sender.delivered) - before
            self.node.send_due()  # at once again: nothing is due
            assert len(self.sender.delivered) - before == first
        finally:
            store.mark_sent = real  # type: ignore[method-assign]

    @rule(job=st.sampled_from(sorted(IN_PROCESS_POINTS)), data=st.data())
    def crash_in_job(self, job, data) -> None:
        point = data.draw(st.sampled_from(IN_PROCESS_POINTS[job]))
        self._crash_at(point)
        try:
            if job == "receive":
                sop = pydicom.uid.generate_uid()
                self.kinds[sop] = "ok"
                study = self.studies[data.draw(st.integers(0, 2))]
                try:
                    self._store(sop, study)
                except SimulatedCrash:
                    if point == "store.after_instance_commit":
                        pass  # committed, but the C-STORE response never left: not acknowledged
            elif job == "screen":
                self.clock.mono += STABLE_S + 0.1
                self.node.tick()
            elif job == "send":
                self.node.send_due()
            else:
                self.clock.wall += 2 * 86400
                self.node.apply_retention()
        except SimulatedCrash:
            pass
        self._abandon_and_reopen()

    @rule()
    def crash_idle(self) -> None:
        self._abandon_and_reopen()

    @rule()
    def restart(self) -> None:
        self.node.store.close()
        self.node = self._open()

    @rule()
    def recovery_again(self) -> None:
        self.node.store.recover()  # idempotent

    @rule()
    def retention(self) -> None:
        self.clock.wall += 2 * 86400
        self.node.apply_retention()

    @rule()
    def resend(self) -> None:
        self.node.store.resend()

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def store_invariants(self) -> None:
        if self.tmp is None:
            return
        assert self.node.store.check_invariants() == []

    @invariant()
    def nothing_acknowledged_is_lost(self) -> None:
        if self.tmp is None:
            return
        delivered = {(b["study"], s) for _, b in self.sender.delivered for s in b["sources"]}
        for sop, study in self.acked.items():
            if sop in self.purged:
                continue
            row = self.node.store.get_instance(sop)
            if row is None:
                # Only retention deletes, and only what was delivered (or skipped) long enough ago.
                assert (study, sop) in delivered or self.kinds.get(sop) == "skip", sop
                self.purged.add(sop)

    # -- the end -----------------------------------------------------------------------------------

    def _drain_and_check(self) -> None:
        crash.set_handler(None)
        self.sender.up = True
        self.node.store.resend()
        for _ in range(60):
            self.clock.mono += 120.0
            self.node.tick()
            self.node.send_due()
            c = self.node.store.counts()
            busy = sum(c["studies"][k] for k in ("receiving", "complete", "screening", "reported"))
            if busy == 0 and c["outbox"]["pending"] == 0:
                if c["studies"]["failed"] == 0:
                    break
                self.node.store.resend()
        store = self.node.store
        assert store.check_invariants() == []
        c = store.counts()
        assert c["outbox"]["pending"] == 0 and c["studies"]["failed"] == 0, c
        for dest in (f"{d.ae_title}@{d.host}:{d.port}" for d in DESTS):
            last: dict[str, dict] = {}
            for d, body in self.sender.delivered:
                if d == dest:
                    last[body["study"]] = body
            for sop, study in self.acked.items():
                if sop in self.purged:
                    continue
                row = store.get_instance(sop)
                if row.state in ("failed", "skipped"):
                    assert row.reason
                    continue
                assert study in last and sop in last[study]["sources"], (dest, sop, row)
            for study, body in last.items():
                st_row = store.get_study(study)
                if st_row is not None and st_row.sr_sop_instance_uid is not None:
                    assert body["uid"] == st_row.sr_sop_instance_uid, "a stale SR was delivered last"


NodeMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=35,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
TestNodeStateMachine = NodeMachine.TestCase


@pytest.fixture(autouse=True)
def _no_crash_env(monkeypatch):
    monkeypatch.delenv(crash.ENV, raising=False)
