"""The state machine's transitions in the store (docs/state-machine.md): supersession, compare-and-set,
quarantine, the node clock, retention by instance, resend, recovery and schema 1 databases."""

from __future__ import annotations

import sqlite3

from pydicom.uid import generate_uid

from screener.store import MIGRATIONS_V1_FOR_TESTS, InstanceResult, SRInfo, Store
from tests.store.test_store import STUDY, STUDY2, Clock, put

DEST = "PACS@127.0.0.1:104"


def open_store(var, clock) -> Store:
    return Store.open(var, clock=clock, monotonic=clock)


def screen(store: Store, study: str = STUDY, destinations=(DEST,), states: dict[str, str] | None = None) -> SRInfo:
    """complete -> screening -> reported through the store, as the node does (SR file written first)."""
    store.force_complete(study)
    (p,) = [p for p in store.pick_for_screening(100, 3) if p.study_uid == study]
    sr_uid = generate_uid()
    rel = store.sr_rel_path(study, sr_uid)
    store.abs_path(rel).parent.mkdir(parents=True, exist_ok=True)
    store.abs_path(rel).write_bytes(b"sr")
    info = SRInfo(sr_uid, study + ".9", "1.2.840.10008.5.1.4.1.1.88.34", p.sr_count + 1, rel)
    states = states or {}
    outs = [
        InstanceResult(
            i.sop_instance_uid, states.get(i.sop_instance_uid, "reported"), "x" if i.sop_instance_uid in states else ""
        )
        for i in p.instances
    ]
    assert store.finish_study(study, outs, info, list(destinations)) == "reported"
    return info


def test_late_instance_while_sr_on_the_wire(tmp_path):
    """Issue 9 item 1: the late image is reported in a second SR that supersedes the first."""
    clock = Clock()
    with open_store(tmp_path / "v", clock) as s:
        first = generate_uid()
        put(s, first)
        sr1 = screen(s)
        (row,) = s.due_outbox()
        assert s.claim_send(row.id, 30) is not None  # the SR is on the wire
        late = generate_uid()
        assert put(s, late).study_reopened
        assert s.get_outbox(row.id).state == "cancelled"
        assert not s.mark_sent(row.id)  # the delivery finishes: the study's new state is untouched
        assert s.get_outbox(row.id).state == "cancelled"
        assert s.get_study(STUDY).state == "receiving"
        assert s.check_invariants() == []
        s.force_complete(STUDY)
        (p,) = s.pick_for_screening(100, 3)
        assert p.sr_count == 1 and [r.sop_instance_uid for r in p.predecessors] == [sr1.sop_instance_uid]
        assert {i.sop_instance_uid for i in p.instances} == {first, late}
        sr2 = SRInfo(generate_uid(), STUDY + ".9", sr1.sop_class_uid, 2, s.sr_rel_path(STUDY, "2.9"))
        s.abs_path(sr2.path).write_bytes(b"sr2")
        outs = [InstanceResult(u, "reported") for u in (first, late)]
        assert s.finish_study(STUDY, outs, sr2, [DEST]) == "reported"
        assert [r.state for r in s.srs_of(STUDY)] == ["superseded", "current"]
        (new,) = s.due_outbox()
        s.claim_send(new.id, 30)
        assert s.mark_sent(new.id)
        assert {s.get_instance(u).state for u in (first, late)} == {"sent"}
        assert s.check_invariants() == []


def test_finish_after_reopen_records_nothing(tmp_path):
    clock = Clock()
    with open_store(tmp_path / "v", clock) as s:
        put(s, generate_uid())
        s.force_complete(STUDY)
        (p,) = s.pick_for_screening(100, 3)
        put(s, generate_uid())  # arrives while screening
        info = SRInfo("1.2.9", STUDY + ".9", "1.2.840.10008.5.1.4.1.1.88.34", 1, "sr/x.dcm")
        assert (
            s.finish_study(STUDY, [InstanceResult(p.instances[0].sop_instance_uid, "reported")], info, [DEST]) is None
        )
        assert s.srs_of(STUDY) == [] and s.outbox_of(STUDY) == []
        assert s.get_instance(p.instances[0].sop_instance_uid).state == "received"


def test_quarantine_after_attempts_and_resend(tmp_path):
    """A study whose screening kills the process is picked alone, then quarantined, never looping."""
    clock = Clock()
    var = tmp_path / "v"
    s = open_store(var, clock)
    sop = generate_uid()
    put(s, sop)
    put(s, generate_uid(), study_uid=STUDY2)
    s.force_complete(STUDY)
    s.force_complete(STUDY2)
    assert {p.study_uid for p in s.pick_for_screening(100, 3)} == {STUDY, STUDY2}
    s.close()  # the process dies while screening both
    alone = []
    for _ in range(10):
        s = open_store(var, clock)  # recovery: back to complete, attempt kept
        picks = s.pick_for_screening(100, 3)
        s.close()  # ... and dies again
        if not picks:
            break
        alone.append(len(picks))
    assert alone == [1, 1, 1, 1]  # suspects are screened alone, two more attempts each, then no loop
    with open_store(var, clock) as s:
        assert s.pick_for_screening(100, 3) == []
        st1, st2 = s.get_study(STUDY), s.get_study(STUDY2)
        assert {st1.state, st2.state} == {"failed"}
        assert st1.reason == "quarantined after 3 screening attempts"
        assert s.get_instance(sop).state == "failed" and "quarantined" in s.get_instance(sop).reason
        assert s.check_invariants() == []
        assert s.resend(STUDY) == 1  # the administrator fixed the cause
        assert s.get_study(STUDY).state == "complete" and s.get_instance(sop).state == "received"
        assert s.get_study(STUDY).screen_attempts == 0


def test_release_study_counts_or_refunds(tmp_path):
    clock = Clock()
    with open_store(tmp_path / "v", clock) as s:
        put(s, generate_uid())
        s.force_complete(STUDY)
        s.pick_for_screening(100, 3)
        assert s.release_study(STUDY, "SR not written (OSError)", retry_in_s=30, count_attempt=False) == "complete"
        st = s.get_study(STUDY)
        assert st.screen_attempts == 0 and st.reason == "SR not written (OSError)"
        assert s.pick_for_screening(100, 3) == []  # not before 30 s of node clock
        clock.t += 30
        assert len(s.pick_for_screening(100, 3)) == 1
        assert s.release_study(STUDY, "screening failed (RuntimeError)", max_attempts=1) == "failed"
        assert s.release_study(STUDY, "again") is None  # compare-and-set: no longer screening


def test_node_clock_ignores_wall_clock_steps_and_survives_restart(tmp_path):
    clock = Clock()
    mono = Clock(500.0)
    var = tmp_path / "v"
    s = Store.open(var, clock=clock, monotonic=mono)
    put(s, generate_uid())
    clock.t -= 3600  # wall clock stepped back an hour
    mono.t += 60
    assert s.complete_studies(60) == [STUDY]
    s.close()
    mono2 = Clock(7.0)  # a new boot: monotonic starts again
    with Store.open(var, clock=clock, monotonic=mono2) as s2:
        assert s2.node_time() >= 60.0
        put(s2, generate_uid(), study_uid=STUDY2)
        mono2.t += 59
        assert s2.complete_studies(60) == []
        mono2.t += 1
        assert s2.complete_studies(60) == [STUDY2]


def test_retry_deadline_ignores_wall_clock(tmp_path):
    clock = Clock()
    mono = Clock(0.0)
    with Store.open(tmp_path / "v", clock=clock, monotonic=mono) as s:
        put(s, generate_uid())
        screen(s)
        (o,) = s.due_outbox()
        s.claim_send(o.id, 10)
        s.send_failed(o.id, "refused", give_up=False)
        clock.t -= 3600
        mono.t += 10
        assert [r.id for r in s.due_outbox()] == [o.id]


def test_retention_by_instance_keeps_unreported_and_deletes_superseded_sr(tmp_path):
    """Issue 9 item 5: retention never deletes an acknowledged instance that was not reported."""
    clock = Clock()
    with open_store(tmp_path / "v", clock) as s:
        a = generate_uid()
        put(s, a)
        sr1 = screen(s)
        (o,) = s.due_outbox()
        s.mark_sent(o.id)
        late = generate_uid()
        put(s, late)  # reopened: receiving
        clock.t += 40 * 86400
        stats = s.retention(30)
        assert stats.instances == 0 and s.get_instance(a) is not None and s.get_instance(late) is not None
        sr2 = screen(s)
        assert [r.state for r in s.srs_of(STUDY)] == ["superseded", "current"]
        stats = s.retention(30)  # the superseded SR file goes at once (no delivery of it pending)
        assert stats.sr_files == 1 and not s.abs_path(sr1.path).exists() and s.abs_path(sr2.path).exists()
        assert s.get_instance(a) is not None  # reported in the pending SR: kept
        (o2,) = s.due_outbox()
        s.mark_sent(o2.id)
        assert s.retention(30).instances == 0  # sent just now
        clock.t += 31 * 86400
        stats = s.retention(30)
        assert (stats.instances, stats.studies, stats.sr_files) == (2, 1, 1)
        assert not s.abs_path(sr2.path).exists()


def test_failed_instances_are_kept(tmp_path):
    clock = Clock()
    with open_store(tmp_path / "v", clock) as s:
        ok, bad = generate_uid(), generate_uid()
        put(s, ok)
        put(s, bad)
        screen(s, states={bad: "failed"})
        (o,) = s.due_outbox()
        s.mark_sent(o.id)
        clock.t += 100 * 86400
        assert s.retention(30).instances == 1
        assert s.get_instance(bad).state == "failed" and s.get_study(STUDY) is not None


def test_resend_never_requeues_a_superseded_sr(tmp_path):
    """Issue 9 item 4: a failed old SR row neither keeps the study failed nor is re-sent."""
    clock = Clock()
    with open_store(tmp_path / "v", clock) as s:
        put(s, generate_uid())
        screen(s)
        (o,) = s.due_outbox()
        s.claim_send(o.id, 1)
        s.send_failed(o.id, "refused", give_up=True)
        assert s.get_study(STUDY).state == "failed"
        put(s, generate_uid())  # late instance: the failed delivery of the old SR is cancelled
        assert s.get_outbox(o.id).state == "cancelled"
        screen(s)
        assert s.resend() == 0
        (new,) = s.due_outbox()
        assert new.id != o.id and s.get_outbox(o.id).state == "cancelled"
        s.mark_sent(new.id)
        assert s.get_study(STUDY).state == "sent"


def test_recovery_is_idempotent_and_repairs(tmp_path):
    clock = Clock()
    var = tmp_path / "v"
    s = open_store(var, clock)
    put(s, generate_uid())
    info = screen(s)
    orphan_sr = s.abs_path(s.sr_rel_path(STUDY, "1.2.3.999"))
    orphan_sr.write_bytes(b"written, never committed")
    s.abs_path(info.path).unlink()  # the current SR file is gone
    s.close()
    with open_store(var, clock) as s2:
        assert not orphan_sr.exists()
        assert s2.get_study(STUDY).state == "complete"  # screened again
        assert all(o.state == "cancelled" for o in s2.outbox_of(STUDY))
        assert s2.check_invariants() == []
        again = s2.recover()
        assert (again.rescreen, again.sr_orphans, again.cancelled, again.resumed) == (0, 0, 0, 0)


def test_schema_1_database_is_migrated_and_repaired(tmp_path):
    """A database written by the old code, in the states issue 9 found: a study `sent` with a late
    instance never reported, a study `reported` without an outbox row, an outbox row pending."""
    var = tmp_path / "v"
    (var / "spool").mkdir(parents=True)
    conn = sqlite3.connect(var / "screener.db")
    for stmt in MIGRATIONS_V1_FOR_TESTS:
        conn.execute(stmt)
    conn.execute("PRAGMA user_version=1")
    t = 1_000_000.0
    for study, state in ((STUDY, "sent"), (STUDY2, "reported")):
        conn.execute(
            "INSERT INTO studies (study_uid, state, first_received_at, last_received_at, n_instances, reason,"
            " sr_path, sr_sop_instance_uid, updated_at) VALUES (?, ?, ?, ?, 1, '', ?, ?, ?)",
            (study, state, t, t, f"sr/{study}/9.9.dcm", "9.9." + study[-1], t),
        )
        (var / "sr" / study).mkdir(parents=True)
        (var / "sr" / study / "9.9.dcm").write_bytes(b"sr")
    for sop, study, state in (("1.1", STUDY, "sent"), ("1.2", STUDY, "received"), ("2.1", STUDY2, "reported")):
        rel = f"spool/{study}/{sop}.dcm"
        (var / rel).parent.mkdir(parents=True, exist_ok=True)
        (var / rel).write_bytes(b"dcm")
        conn.execute(
            "INSERT INTO instances VALUES (?, '1.2.840.10008.5.1.4.1.1.1.1', ?, ?, '1.2.840.10008.1.2.1', ?, 3, 'M',"
            " 'x', ?, 1, ?, '', ?)",
            (sop, study, study + ".1", rel, t, state, t),
        )
    conn.commit()
    conn.close()
    clock = Clock()
    with open_store(var, clock) as s:
        assert s.get_study(STUDY).state == "complete"  # the unreported late instance is screened
        assert s.get_study(STUDY2).state == "reported"
        assert s.ensure_outbox([DEST]) == 1  # the missing delivery row
        assert s.check_invariants() == []
        assert s.get_sr(s.get_study(STUDY2).sr_id).sop_instance_uid == "9.9.2"


def test_batch_takes_several_studies_up_to_the_limit(tmp_path):
    clock = Clock()
    with open_store(tmp_path / "v", clock) as s:
        studies = [STUDY, STUDY2, STUDY + ".3"]
        for study in studies:
            for _ in range(2):
                put(s, generate_uid(), study_uid=study)
            clock.t += 1
        for study in studies:
            s.force_complete(study)
        picks = s.pick_for_screening(5, 3)
        assert [p.study_uid for p in picks] == studies[:2]  # oldest first, 4 images <= 5
        assert [p.study_uid for p in s.pick_for_screening(1, 3)] == [studies[2]]  # a bigger study alone


def test_invariant_check_names_each_broken_promise(tmp_path):
    """check_invariants is what every state-machine test relies on: corrupt committed state behind the
    Store's back and each broken promise is reported."""
    clock = Clock()
    store = open_store(tmp_path / "v", clock)
    try:
        put(store, "1.1")
        put(store, "1.2")
        screen(store)
        assert store.check_invariants() == []
        c = sqlite3.connect(tmp_path / "v" / "screener.db")
        with c:
            c.execute("UPDATE studies SET state = 'sent' WHERE study_uid = ?", (STUDY,))
            c.execute("UPDATE instances SET state = 'received' WHERE sop_instance_uid = '1.2'")
            c.execute("UPDATE instances SET sr_id = NULL WHERE sop_instance_uid = '1.1'")
        c.close()
        found = "\n".join(store.check_invariants())
        assert "instance 1.2 is received in a sent study" in found
        assert "instance 1.1 (reported) is not in the current SR of its sent study" in found
        assert f"study {STUDY} is sent with a delivery of its current SR not sent" in found
        c = sqlite3.connect(tmp_path / "v" / "screener.db")
        with c:
            c.execute("UPDATE studies SET state = 'failed', reason = '' WHERE study_uid = ?", (STUDY,))
        c.close()
        assert f"study {STUDY} is failed without a reason" in store.check_invariants()
    finally:
        store.close()
