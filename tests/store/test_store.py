"""screener.store: durable spool + SQLite state."""

from __future__ import annotations

import os
import sqlite3
import threading
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from structlog.testing import capture_logs

from screener.store import SCHEMA_VERSION, InstanceResult, SRInfo, Store, StoreError, is_valid_uid

DX = "1.2.840.10008.5.1.4.1.1.1.1"
STUDY = "1.2.826.0.1.3680043.8.498.1"
STUDY2 = "1.2.826.0.1.3680043.8.498.2"


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def part10(sop_uid: str, study_uid: str = STUDY, name: str = "Doe^Jane") -> bytes:
    ds = Dataset()
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.PatientName = name
    ds.PatientID = "PID-12345"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def put(store: Store, sop_uid: str, study_uid: str = STUDY, data: bytes | None = None):
    return store.store_instance(
        data if data is not None else part10(sop_uid, study_uid),
        sop_class_uid=DX,
        sop_instance_uid=sop_uid,
        study_uid=study_uid,
        series_uid=study_uid + ".1",
        transfer_syntax=ExplicitVRLittleEndian,
        calling_aet="PACS",
        address="127.0.0.1",
    )


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = Store.open(tmp_path / "var", clock=clock, monotonic=clock)
    yield s
    s.close()


def test_open_creates_layout_and_schema(tmp_path):
    with Store.open(tmp_path / "v") as s:
        assert (tmp_path / "v" / "spool").is_dir()
        assert (tmp_path / "v" / "screener.db").is_file()
        assert s.owner
    conn = sqlite3.connect(tmp_path / "v" / "screener.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_newer_schema_refused(tmp_path):
    Store.open(tmp_path / "v").close()
    conn = sqlite3.connect(tmp_path / "v" / "screener.db")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        Store.open(tmp_path / "v")


def test_store_writes_part10_file_and_row(store):
    sop = generate_uid()
    out = put(store, sop)
    assert not out.duplicate and out.new_study
    assert out.path == store.var_dir / "spool" / STUDY / f"{sop}.dcm"
    ds = pydicom.dcmread(out.path)
    assert ds.SOPInstanceUID == sop and ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    row = store.get_instance(sop)
    assert row.state == "received" and row.study_uid == STUDY and row.size == out.size
    assert row.path == f"spool/{STUDY}/{sop}.dcm" and row.calling_aet == "PACS"
    study = store.get_study(STUDY)
    assert study.state == "receiving" and study.n_instances == 1
    assert not list(store.spool_dir.rglob("*.part"))


def test_invalid_uid_refused(store):
    with pytest.raises(ValueError):
        put(store, "1.2.3", study_uid="../../etc", data=b"x")
    assert is_valid_uid("1.2.840.10008.1.2") and not is_valid_uid("1.2.a") and not is_valid_uid("")
    assert not is_valid_uid("1." + "2" * 64)


def test_reopen_keeps_everything(tmp_path, clock):
    var = tmp_path / "var"
    s = Store.open(var, clock=clock, monotonic=clock)
    sops = [generate_uid() for _ in range(3)]
    for sop in sops:
        put(s, sop)
    s.record_result(
        sops[0],
        "spondylosis",
        "1.0.0",
        "onnx-fp32",
        0.9,
        "present",
        0.5,
        roi={"x0": 1, "y0": 2, "x1": 3, "y1": 4},
        seconds=0.1,
    )
    oid = s.enqueue(STUDY, "PACS@127.0.0.1:104", "sr/x.dcm")
    s.close()
    s2 = Store.open(var, clock=clock, monotonic=clock)
    try:
        assert {i.sop_instance_uid for i in s2.instances_of(STUDY)} == set(sops)
        assert s2.get_study(STUDY).n_instances == 3
        (r,) = s2.results_of(STUDY)
        assert r.roi == {"x0": 1, "y0": 2, "x1": 3, "y1": 4} and r.finding == "present"
        assert s2.get_outbox(oid).state == "pending"
        for sop in sops:
            assert (var / "spool" / STUDY / f"{sop}.dcm").is_file()
    finally:
        s2.close()


def test_recovery_removes_part_and_unacknowledged_files(tmp_path, clock):
    var = tmp_path / "var"
    s = Store.open(var, clock=clock, monotonic=clock)
    kept = generate_uid()
    put(s, kept)
    s.set_study_state(STUDY, "screening")
    s.close()
    folder = var / "spool" / STUDY
    (folder / "1.2.3.dcm.abc.part").write_bytes(b"partial")
    (folder / "1.2.4.dcm").write_bytes(b"renamed but never recorded")
    (var / "spool" / "1.2.99").mkdir()
    (var / "spool" / "1.2.99" / "1.2.5.dcm.x.part").write_bytes(b"x")
    with capture_logs() as logs:
        s2 = Store.open(var, clock=clock, monotonic=clock)
    try:
        assert sorted(p.name for p in folder.iterdir()) == [f"{kept}.dcm"]
        assert not (var / "spool" / "1.2.99").exists()
        assert s2.get_study(STUDY).state == "complete"
        rec = [e for e in logs if e["event"] == "store_recovered"][0]
        assert rec["part_files"] == 2 and rec["orphans"] == 1 and rec["resumed"] == 1
    finally:
        s2.close()


def test_missing_spool_file_marks_instance_failed(tmp_path, clock):
    var = tmp_path / "var"
    s = Store.open(var, clock=clock, monotonic=clock)
    sop = generate_uid()
    out = put(s, sop)
    s.close()
    out.path.unlink()
    with Store.open(var, clock=clock, monotonic=clock) as s2:
        row = s2.get_instance(sop)
        assert row.state == "failed" and "missing" in row.reason


def test_second_process_is_not_owner_and_skips_recovery(tmp_path, clock):
    var = tmp_path / "var"
    with Store.open(var, clock=clock, monotonic=clock) as owner:
        put(owner, generate_uid())
        stray = var / "spool" / STUDY / "9.9.dcm.zz.part"
        stray.write_bytes(b"in flight")
        with Store.open(var, clock=clock, monotonic=clock) as other:
            assert owner.owner and not other.owner
            assert stray.exists()  # an in-flight write of the running node is left alone
            assert other.counts()["instances"]["received"] == 1


def test_repeat_is_idempotent(store, clock):
    sop = generate_uid()
    put(store, sop)
    with capture_logs() as logs:
        out = put(store, sop, data=part10(sop, name="Other^Bytes"))
    assert out.duplicate and not out.new_study
    row = store.get_instance(sop)
    assert row.n_received == 2
    assert store.get_study(STUDY).n_instances == 1
    assert store.counts()["instances"]["received"] == 1
    assert pydicom.dcmread(out.path).PatientName == "Other^Bytes"  # replaced atomically
    assert [e["duplicate"] for e in logs if e["event"] == "instance_state"] == [True]
    assert not list(store.spool_dir.rglob("*.part"))


def test_repeat_in_later_state_does_not_reopen_but_new_instance_does(store, clock):
    sop = generate_uid()
    put(store, sop)
    store.set_instance_state(sop, "screened")
    store.set_study_state(STUDY, "screened")
    out = put(store, sop)
    assert out.duplicate and not out.study_reopened
    assert store.get_study(STUDY).state == "screened"
    assert store.get_instance(sop).state == "screened"
    clock.t += 10
    out = put(store, generate_uid())
    assert out.study_reopened
    study = store.get_study(STUDY)
    assert study.state == "receiving" and study.n_instances == 2 and study.last_received_at == clock.t


def test_repeat_of_failed_instance_retries_it(store):
    sop = generate_uid()
    put(store, sop)
    store.set_instance_state(sop, "failed", "cannot decode")
    store.set_study_state(STUDY, "failed", "all instances failed")
    out = put(store, sop)
    assert out.duplicate and out.study_reopened
    assert store.get_instance(sop).state == "received"
    assert store.get_study(STUDY).state == "receiving"


def test_instance_moving_to_another_study(store):
    sop = generate_uid()
    old = put(store, sop).path
    new = put(store, sop, study_uid=STUDY2).path
    assert not old.exists() and new.exists()
    assert store.get_study(STUDY).n_instances == 0
    assert store.get_study(STUDY2).n_instances == 1
    assert store.get_instance(sop).study_uid == STUDY2


def test_concurrent_stores(store):
    sops = [generate_uid() for _ in range(20)]
    errors: list[BaseException] = []

    def work(chunk):
        try:
            for sop in chunk:
                put(store, sop)
                put(store, sop)  # same UID again, possibly racing another thread's write
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(sops[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert store.get_study(STUDY).n_instances == 20
    assert len(list((store.spool_dir / STUDY).iterdir())) == 20


def test_study_completion_after_stable_time(store, clock):
    put(store, generate_uid())
    put(store, generate_uid(), study_uid=STUDY2)
    assert store.complete_studies(60) == []
    clock.t += 30
    put(store, generate_uid(), study_uid=STUDY2)  # STUDY2 still receiving: timer restarts
    clock.t += 29
    assert store.complete_studies(60) == []
    clock.t += 1
    assert store.complete_studies(60) == [STUDY]
    assert store.get_study(STUDY).state == "complete"
    assert store.get_study(STUDY2).state == "receiving"
    clock.t += 30
    assert store.complete_studies(60) == [STUDY2]
    assert [s.study_uid for s in store.studies_in("complete")] == [STUDY, STUDY2]


def test_force_complete_and_compare_and_set(store):
    put(store, generate_uid())
    assert store.force_complete(STUDY)
    assert not store.force_complete(STUDY)  # no longer receiving
    assert not store.force_complete("1.2.3.4")
    assert store.set_study_state(STUDY, "screening", expect=("complete",))
    put(store, generate_uid())  # new instance while screening: back to receiving
    assert not store.set_study_state(STUDY, "screened", expect=("screening",))
    assert store.get_study(STUDY).state == "receiving"
    with pytest.raises(ValueError):
        store.set_study_state(STUDY, "bogus")


def test_screening_goes_back_to_complete_on_reopen(tmp_path, clock):
    var = tmp_path / "var"
    s = Store.open(var, clock=clock, monotonic=clock)
    put(s, generate_uid())
    s.force_complete(STUDY)
    s.set_study_state(STUDY, "screening")
    s.close()
    with Store.open(var, clock=clock, monotonic=clock) as s2:
        assert s2.get_study(STUDY).state == "complete"
        assert s2.events_of(STUDY)[-1].detail.startswith("restart")


def test_results_replace_on_rescreen(store):
    sop = generate_uid()
    put(store, sop)
    store.record_result(sop, "spondylosis", "1.0.0", "onnx-fp32", 0.2, "absent", 0.5)
    store.record_result(sop, "spondylosis", "1.1.0", "tensorrt", 0.8, "present", 0.5, seconds=0.02)
    (r,) = store.results_of(STUDY)
    assert (r.engine_version, r.backend, r.finding, r.roi) == ("1.1.0", "tensorrt", "present", None)
    with pytest.raises(ValueError):
        store.record_result(sop, "x", "1", "b", 0.5, "maybe", 0.5)


def _reported_study(store, destinations=("PACS@127.0.0.1:104",), study=STUDY) -> str:
    """A study taken through the node's transitions up to reported (SR file written)."""
    sop = generate_uid()
    put(store, sop, study_uid=study)
    assert store.force_complete(study)
    (p,) = store.pick_for_screening(32, 3)
    sr_uid = generate_uid()
    rel = store.sr_rel_path(study, sr_uid)
    store.abs_path(rel).parent.mkdir(parents=True, exist_ok=True)
    store.abs_path(rel).write_bytes(b"sr")
    info = SRInfo(sr_uid, study + ".9", "1.2.840.10008.5.1.4.1.1.88.34", p.sr_count + 1, rel)
    outcomes = [InstanceResult(i.sop_instance_uid, "reported") for i in p.instances]
    assert store.finish_study(study, outcomes, info, list(destinations)) == "reported"
    return sop


def test_outbox_retry_then_sent(store, clock):
    sop = _reported_study(store)
    (o,) = store.due_outbox()
    assert store.get_study(STUDY).state == "reported" and store.get_instance(sop).state == "reported"
    claimed = store.claim_send(o.id, backoff_s=30)
    assert claimed.attempts == 1 and store.due_outbox() == []  # next try scheduled before sending
    store.send_failed(o.id, "connection refused", give_up=False)
    clock.t += 29
    assert store.due_outbox() == []
    clock.t += 1
    (o,) = store.due_outbox()
    assert o.attempts == 1 and o.last_error == "connection refused" and o.state == "pending"
    assert store.claim_send(o.id, backoff_s=30).attempts == 2
    clock.t += 59
    assert store.due_outbox() == []  # 30 s x 2
    assert store.mark_sent(o.id)
    assert store.get_outbox(o.id).state == "sent"
    assert store.get_study(STUDY).state == "sent"
    assert store.get_instance(sop).state == "sent"
    assert store.check_invariants() == []


def test_outbox_study_sent_only_when_all_destinations_sent(store):
    _reported_study(store, destinations=("A@h:1", "B@h:2"))
    a, b = store.outbox_of(STUDY)
    assert not store.mark_sent(a.id)
    assert store.get_study(STUDY).state == "reported"
    assert store.mark_sent(b.id)


def test_outbox_give_up_and_requeue(store, clock):
    _reported_study(store, destinations=("PACS@10.0.0.1:104",))
    (o,) = store.outbox_of(STUDY)
    store.claim_send(o.id, 1)
    store.send_failed(o.id, "timeout", give_up=True)
    assert store.get_outbox(o.id).state == "failed"
    study = store.get_study(STUDY)
    assert study.state == "failed" and "timeout" in study.reason and "PACS@10.0.0.1:104" in study.reason
    clock.t += 100
    assert store.due_outbox() == []
    fails = store.failures(10)
    assert {(f.kind, f.uid) for f in fails} == {("study", STUDY), ("outbox", STUDY)}
    assert store.counts()["outbox"]["failed"] == 1
    assert store.resend() == 1
    assert store.get_study(STUDY).state == "reported"
    (o,) = store.due_outbox()
    assert o.attempts == 0 and o.state == "pending"
    assert store.resend() == 0
    assert store.check_invariants() == []


def test_counts(store):
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    for sop in (a, b):
        put(store, sop)
    put(store, c, study_uid=STUDY2)
    store.set_instance_state(a, "skipped", "no engine for view")
    counts = store.counts()
    assert counts["instances"] == {"received": 2, "screened": 0, "reported": 0, "sent": 0, "skipped": 1, "failed": 0}
    assert counts["studies"]["receiving"] == 2 and sum(counts["studies"].values()) == 2
    assert sum(counts["outbox"].values()) == 0


def test_retention_deletes_old_sent_studies(store, clock):
    sop = _reported_study(store, destinations=("A@h:1",))
    sr = store.abs_path(store.get_study(STUDY).sr_path)
    (o,) = store.outbox_of(STUDY)
    store.mark_sent(o.id)
    other = generate_uid()
    put(store, other, study_uid=STUDY2)  # receiving: never purged
    path = store.abs_path(store.get_instance(sop).path)
    assert store.retention(30, now=clock.t + 29 * 86400).instances == 0
    stats = store.retention(30, now=clock.t + 31 * 86400)
    assert (stats.instances, stats.studies, stats.sr_files) == (1, 1, 1)
    assert not path.exists() and not path.parent.exists()
    assert not sr.exists() and store.var_dir.is_dir() and store.spool_dir.is_dir()
    assert store.get_study(STUDY) is None and store.get_instance(sop) is None
    assert store.results_of(STUDY) == [] and store.outbox_of(STUDY) == []
    assert store.get_instance(other) is not None
    assert store.events_of(STUDY)[-1].state == "purged"  # the audit trail stays


def test_events_row_per_transition(store):
    sop = generate_uid()
    put(store, sop)
    store.force_complete(STUDY)
    store.set_study_state(STUDY, "screening")
    store.set_instance_state(sop, "screened")
    store.set_study_state(STUDY, "screened")
    ev_study = [(e.kind, e.state) for e in store.events_of(STUDY)]
    assert ev_study == [("study", "receiving"), ("study", "complete"), ("study", "screening"), ("study", "screened")]
    assert [(e.kind, e.state) for e in store.events_of(sop)] == [("instance", "received"), ("instance", "screened")]


def test_no_phi_in_logs(store):
    with capture_logs() as logs:
        sop = generate_uid()
        put(store, sop)
        put(store, sop)
        store.force_complete(STUDY)
        store.set_instance_state(sop, "failed", "decode error")
    text = repr(logs)
    assert "Doe^Jane" not in text and "PID-12345" not in text
    assert sop in text and STUDY in text


def test_free_space(store):
    assert store.free_space_ok(0)
    assert not store.free_space_ok(10**12)


def test_failed_db_write_leaves_no_file(store, monkeypatch):
    sop = generate_uid()

    def boom(*a, **k):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_event", boom)
    with pytest.raises(sqlite3.OperationalError):
        put(store, sop)
    assert not (store.spool_dir / STUDY / f"{sop}.dcm").exists()
    monkeypatch.undo()
    assert store.get_instance(sop) is None and store.get_study(STUDY) is None


def test_file_is_fsynced_before_row(store, monkeypatch):
    """The row is only written after the file is in place under its final name."""
    sop = generate_uid()
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(store.get_instance(sop))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    put(store, sop)
    assert seen == [None] and store.get_instance(sop) is not None


def test_uses_given_var_dir_relative_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Store.open(Path("rel")) as s:
        out = put(s, generate_uid())
        assert out.path.is_absolute() and out.path.exists()
