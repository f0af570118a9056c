"""screener.dicom.listener: Verification + Storage SCP on loopback, with a pynetdicom SCU (and dcmtk if present)."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComprehensiveSRStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    Verification,
)
from structlog.testing import capture_logs

from screener.config import NodeSettings, Settings
from screener.dicom.listener import TRANSFER_SYNTAXES, Listener, address_allowed, build_ae, read_header
from screener.errors import ConfigError
from screener.store import Store

DX = str(DigitalXRayImageStorageForPresentation)
OUR_AET = "CSPINE"
PHI = ("Doe^Jane", "PID-12345", "19700101")


def make_dx(
    study_uid: str | None = None, sop_uid: str | None = None, *, sop_class: str = DX, with_study: bool = True
) -> Dataset:
    """A 64x64 12-bit MONOCHROME2 image with patient data that must never reach a log."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid or generate_uid()
    if with_study:
        ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-12345"
    ds.PatientBirthDate = "19700101"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    arr = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 4096
    ds.set_pixel_data(arr, "MONOCHROME2", 12)
    return ds


def associate(port: int, *, calling: str = "TESTSCU", called: str = OUR_AET, contexts=None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop, tss in contexts or [(DX, [ExplicitVRLittleEndian])]:
        ae.add_requested_context(sop, tss)
    return ae.associate("127.0.0.1", port, ae_title=called)


def store_one(port: int, ds: Dataset, tss=(ExplicitVRLittleEndian,)) -> Dataset:
    assoc = associate(port, contexts=[(ds.SOPClassUID, list(tss))])
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO)
    with capture_logs() as captured:
        yield captured
    text = repr(captured) + caplog.text
    for value in PHI:
        assert value not in text, "patient data in the logs"


@pytest.fixture
def node(tmp_path, logs):
    started: list[tuple[Listener, Store]] = []

    def make(**node_kw):
        kw = dict(
            ae_title=OUR_AET,
            host="127.0.0.1",
            port=0,
            var_dir=str(tmp_path / "var"),
            min_free_mb=0,
            acse_timeout_s=10.0,
            dimse_timeout_s=10.0,
            network_timeout_s=10.0,
        )
        kw.update(node_kw)
        settings = Settings(node=NodeSettings(**kw))
        store = Store.open(tmp_path / f"var{len(started)}")
        stored: list[str] = []
        listener = Listener(settings, store, on_stored=stored.append)
        listener.stored = stored  # type: ignore[attr-defined]
        listener.start()
        started.append((listener, store))
        return listener, store

    yield make
    for listener, store in started:
        listener.stop()
        store.close()


def test_build_ae_contexts():
    ae = build_ae(Settings(node=NodeSettings(max_associations=3, allowed_calling_aets=["PACS"])))
    assert ae.maximum_pdu_size == 0 and ae.maximum_associations == 3
    assert ae.require_called_aet and ae.require_calling_aet == ["PACS"]
    by_sop = {str(cx.abstract_syntax): set(cx.transfer_syntax) for cx in ae.supported_contexts}
    assert str(Verification) in by_sop
    for sop in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"):
        assert by_sop[sop] == set(TRANSFER_SYNTAXES)
    assert "1.2.840.10008.1.2.4.90" in TRANSFER_SYNTAXES and "1.2.840.10008.1.2.5" in TRANSFER_SYNTAXES
    assert len(by_sop) == 4


def test_echo(node):
    listener, _ = node()
    assoc = associate(listener.port, contexts=[(Verification, [ImplicitVRLittleEndian])])
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_store_is_durable_when_success_arrives(node, logs):
    listener, store = node()
    ds = make_dx()
    rsp = store_one(listener.port, ds)
    assert rsp.Status == 0x0000
    row = store.get_instance(ds.SOPInstanceUID)  # already there: no waiting
    assert row is not None and row.state == "received" and row.study_uid == ds.StudyInstanceUID
    assert row.calling_aet == "TESTSCU" and row.source_address == "127.0.0.1"
    assert row.transfer_syntax == ExplicitVRLittleEndian and row.sop_class_uid == DX
    saved = pydicom.dcmread(store.abs_path(row.path))  # a Part 10 file, read as is
    assert saved.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert saved.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert saved.PatientName == "Doe^Jane"
    assert np.array_equal(saved.pixel_array, ds.pixel_array)
    assert store.get_study(ds.StudyInstanceUID).state == "receiving"
    assert listener.stored == [ds.StudyInstanceUID]
    assert any(e["event"] == "instance_state" and e["sop_instance_uid"] == ds.SOPInstanceUID for e in logs)


def test_repeat_is_idempotent(node):
    listener, store = node()
    ds = make_dx()
    assoc = associate(listener.port, contexts=[(DX, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])])
    assert assoc.send_c_store(ds).Status == 0x0000
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert store_one(listener.port, ds).Status == 0x0000
    assert store.get_instance(ds.SOPInstanceUID).n_received == 3
    assert store.counts()["instances"]["received"] == 1
    assert len(list((store.spool_dir / ds.StudyInstanceUID).iterdir())) == 1


def test_unknown_calling_aet_rejected(node, logs):
    listener, store = node(allowed_calling_aets=["PACS"])
    assoc = associate(listener.port, calling="INTRUDER")
    assert assoc.is_rejected and not assoc.is_established
    assert any(e["event"] == "association_refused" and e["calling_aet"] == "INTRUDER" for e in logs)
    assoc = associate(listener.port, calling="PACS")
    assert assoc.is_established
    assoc.release()


def test_wrong_called_aet_rejected(node, logs):
    listener, _ = node()
    assoc = associate(listener.port, called="SOMEONEELSE")
    assert assoc.is_rejected
    refused = [e for e in logs if e["event"] == "association_refused"]
    assert refused and refused[0]["called_aet"] == "SOMEONEELSE" and refused[0]["address"] == "127.0.0.1"


def test_address_allow_list(node, logs):
    listener, _ = node(allowed_addresses=["10.0.0.0/8"])
    assoc = associate(listener.port)
    # Refused at accept (before it takes a slot or a thread): the connection is closed at once.
    assert not assoc.is_established
    refused = [e for e in logs if e["event"] == "connection_refused"]
    assert [(e["reason"], e["address"]) for e in refused] == [("source address not allowed", "127.0.0.1")]
    listener2, _ = node(allowed_addresses=["10.1.2.3", "127.0.0.0/8"])
    assoc = associate(listener2.port)
    assert assoc.is_established
    assoc.release()


def test_address_allowed_helper():
    import ipaddress

    nets = [ipaddress.ip_network("192.168.1.0/24"), ipaddress.ip_network("::1/128")]
    assert address_allowed("192.168.1.7", nets) and address_allowed("::ffff:192.168.1.7", nets)
    assert address_allowed("::1", nets) and not address_allowed("192.168.2.1", nets)
    assert not address_allowed("not-an-ip", nets) and address_allowed("1.2.3.4", [])
    with pytest.raises(ConfigError, match="allowed_addresses"):
        Listener(Settings(node=NodeSettings(allowed_addresses=["pacs.example.org"])), store=None)  # type: ignore[arg-type]


def test_missing_study_uid_refused_and_node_keeps_serving(node, logs):
    listener, store = node()
    bad = make_dx(with_study=False)
    rsp = store_one(listener.port, bad)
    assert 0xC000 <= rsp.Status <= 0xCFFF
    assert rsp.Status == 0xC002 and "Study Instance UID" in rsp.ErrorComment
    assert store.get_instance(bad.SOPInstanceUID) is None
    refused = [e for e in logs if e["event"] == "store_refused"]
    assert refused[0]["status"] == "0xC002" and refused[0]["sop_instance_uid"] == bad.SOPInstanceUID
    assert store_one(listener.port, make_dx()).Status == 0x0000


def test_unparseable_dataset_refused(node, tmp_path, monkeypatch):
    """A data set whose element stream breaks off inside a sequence: 0xC001, nothing stored."""
    import struct

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import _config

    listener, store = node()
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / "broken.dcm"
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(f, meta, enforce_standard=True)
        f.write(struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF) + b"\0" * 3)
    # Send the file's bytes as they are (no decode on the SCU side).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = associate(listener.port)
    rsp = assoc.send_c_store(path)
    assoc.release()
    assert rsp.Status == 0xC001
    assert store.get_instance(sop) is None
    monkeypatch.undo()
    assert store_one(listener.port, make_dx()).Status == 0x0000


def test_uid_with_wrong_vr_refused(node):
    """A Study Instance UID sent as a number (wrong VR) is not taken for the UID '1'."""
    from pydicom.dataelem import DataElement

    listener, store = node()
    ds = make_dx()
    ds[0x0020000D] = DataElement(0x0020000D, "US", 1)
    rsp = store_one(listener.port, ds)
    assert rsp.Status == 0xC002
    assert store.get_instance(ds.SOPInstanceUID) is None


def test_read_header_stops_before_pixels():
    ds = make_dx()
    from pynetdicom.dsutils import encode

    raw = encode(ds, False, True)
    hdr = read_header(raw, ExplicitVRLittleEndian)
    assert hdr.StudyInstanceUID == ds.StudyInstanceUID and hdr.SeriesInstanceUID == ds.SeriesInstanceUID
    assert "PixelData" not in hdr and "Rows" not in hdr


def test_unsupported_sop_class_context_rejected_node_keeps_serving(node, logs):
    listener, store = node()
    # CT only: the node accepts the association with the CT context refused; pynetdicom's SCU then
    # aborts ("No accepted presentation contexts"). Nothing is stored, and the node keeps serving.
    assoc = associate(listener.port, contexts=[(CTImageStorage, [ExplicitVRLittleEndian])])
    assert not assoc.is_established and assoc.is_aborted
    ct = make_dx(sop_class=str(CTImageStorage))
    accepted = [e for e in logs if e["event"] == "association_accepted"]
    assert accepted[0]["accepted_contexts"] == 0 and accepted[0]["rejected_sop_classes"] == 1
    # An SR offered beside a DX: SR refused, DX accepted and stored.
    assoc = associate(
        listener.port, contexts=[(ComprehensiveSRStorage, [ExplicitVRLittleEndian]), (DX, [ExplicitVRLittleEndian])]
    )
    assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [DX]
    assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == [str(ComprehensiveSRStorage)]
    ok = make_dx()
    assert assoc.send_c_store(ok).Status == 0x0000
    assoc.release()
    assert store.get_instance(ok.SOPInstanceUID) is not None and store.get_instance(ct.SOPInstanceUID) is None


def test_low_free_space_out_of_resources(node, logs):
    listener, store = node(min_free_mb=10**12)
    ds = make_dx()
    rsp = store_one(listener.port, ds)
    assert rsp.Status == 0xA700 and "free disk space" in rsp.ErrorComment
    assert store.get_instance(ds.SOPInstanceUID) is None
    assert not any(store.spool_dir.iterdir())
    assert [e["status"] for e in logs if e["event"] == "store_refused"] == ["0xA700"]


def test_disk_write_failure_out_of_resources(node, monkeypatch):
    listener, store = node()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_write_atomic", full)
    ds = make_dx()
    rsp = store_one(listener.port, ds)
    assert rsp.Status == 0xA700 and "No space" in rsp.ErrorComment
    assert store.get_instance(ds.SOPInstanceUID) is None


def test_handler_exception_is_contained(node, monkeypatch, logs):
    listener, store = node()

    def boom(*a, **k):
        raise RuntimeError("Doe^Jane")  # a message that must not be logged

    monkeypatch.setattr(store, "free_space_ok", boom)
    assert store_one(listener.port, make_dx()).Status == 0xC211
    assert any(e["event"] == "store_refused" and e["error_type"] == "RuntimeError" for e in logs)
    monkeypatch.undo()
    assert store_one(listener.port, make_dx()).Status == 0x0000


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k"])
def test_compressed_transfer_syntax_accepted(node, syntax):
    listener, store = node()
    ds = make_dx()
    original = ds.pixel_array.copy()
    ds.compress(syntax)
    rsp = store_one(listener.port, ds, tss=(syntax,))
    assert rsp.Status == 0x0000
    row = store.get_instance(ds.SOPInstanceUID)
    assert row.transfer_syntax == syntax
    saved = pydicom.dcmread(store.abs_path(row.path))
    assert saved.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(saved.pixel_array, original)


def test_deflated_transfer_syntax_accepted(node):
    listener, store = node()
    ds = make_dx()
    rsp = store_one(listener.port, ds, tss=(DeflatedExplicitVRLittleEndian,))
    assert rsp.Status == 0x0000
    row = store.get_instance(ds.SOPInstanceUID)
    assert row.transfer_syntax == DeflatedExplicitVRLittleEndian
    saved = pydicom.dcmread(store.abs_path(row.path))
    assert saved.StudyInstanceUID == ds.StudyInstanceUID
    assert np.array_equal(saved.pixel_array, ds.pixel_array)


def test_stop_frees_port(node):
    listener, _ = node()
    port = listener.port
    listener.stop()
    assert not listener.running
    assoc = associate(port)
    assert not assoc.is_established


# -- dcmtk --------------------------------------------------------------------------------------

needs_dcmtk = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("echoscu") is None,
    reason="dcmtk (storescu, echoscu) not installed: apt-get install dcmtk",
)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


@needs_dcmtk
def test_dcmtk_echoscu_and_storescu(node, tmp_path: Path):
    listener, store = node()
    port = str(listener.port)
    r = _run(["echoscu", "-aet", "DCMTKSCU", "-aec", OUR_AET, "127.0.0.1", port])
    assert r.returncode == 0, r.stderr
    ds = make_dx()
    path = tmp_path / "dx.dcm"
    ds.save_as(path, enforce_file_format=True)
    r = _run(["storescu", "-aet", "DCMTKSCU", "-aec", OUR_AET, "127.0.0.1", port, str(path)])
    assert r.returncode == 0, r.stderr
    row = store.get_instance(ds.SOPInstanceUID)
    assert row is not None and row.calling_aet == "DCMTKSCU"
    assert pydicom.dcmread(store.abs_path(row.path)).SOPInstanceUID == ds.SOPInstanceUID


@needs_dcmtk
def test_dcmtk_storescu_ct_refused_node_keeps_serving(node, tmp_path: Path):
    listener, store = node()
    ct = make_dx(sop_class=str(CTImageStorage))
    path = tmp_path / "ct.dcm"
    ct.save_as(path, enforce_file_format=True)
    r = _run(["storescu", "-aet", "DCMTKSCU", "-aec", OUR_AET, "127.0.0.1", str(listener.port), str(path)])
    assert "presentation context" in (r.stdout + r.stderr).lower()
    assert store.get_instance(ct.SOPInstanceUID) is None
    r = _run(["echoscu", "-aec", OUR_AET, "127.0.0.1", str(listener.port)])
    assert r.returncode == 0, r.stderr


# -- connections that cannot starve the node ----------------------------------------------------

# The first 16 bytes of an A-ASSOCIATE-RQ announcing 1000 bytes that never come.
HALF_OPEN_RQ = b"\x01\x00" + (1000).to_bytes(4, "big") + b"\x00\x01\x00\x00" + b"CSPINE"


def half_open(port: int, source: str, payload: bytes = HALF_OPEN_RQ) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    if payload:
        s.sendall(payload)
    return s


def closed_by_node(s: socket.socket) -> bool:
    """True when the node closed the connection (EOF or reset) within the socket's timeout."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def echo_ok(port: int) -> bool:
    assoc = associate(port, contexts=[(Verification, [ImplicitVRLittleEndian])])
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_half_open_sockets_from_one_address_do_not_starve_others(node, logs):
    """max_associations half-open sockets from one address hold at most that address's slots: the
    allowed PACS (another address) still gets through at once, and the excess is refused at accept."""
    listener, _ = node(max_associations=10, max_associations_per_address=5, acse_timeout_s=60.0)
    held = [half_open(listener.port, "127.0.0.2") for _ in range(10)]
    try:
        refused = [s for s in held[5:] if closed_by_node(s)]
        assert len(refused) == 5
        assert echo_ok(listener.port)
        open_now = listener._guard.open_connections()
        assert open_now.get("127.0.0.2") == 5
    finally:
        for s in held:
            s.close()
    events = [e for e in logs if e["event"] == "connection_refused"]
    assert len(events) == 5
    assert {(e["address"], e["reason"]) for e in events} == {("127.0.0.2", "too many connections from this address")}


def test_negotiation_deadline_closes_half_open_connections(node, logs):
    listener, _ = node(acse_timeout_s=1.0)
    held = [half_open(listener.port, "127.0.0.2"), half_open(listener.port, "127.0.0.2", payload=b"")]
    try:
        assert all(closed_by_node(s) for s in held)
    finally:
        for s in held:
            s.close()
    timeouts = [e for e in logs if e["event"] == "connection_timeout"]
    assert len(timeouts) == 2 and {e["address"] for e in timeouts} == {"127.0.0.2"}
    deadline = time.monotonic() + 30
    while listener._guard.open_connections() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listener._guard.open_connections() == {}
    assert echo_ok(listener.port)


def test_disallowed_address_refused_at_accept(node, logs):
    """Ten half-open connections from a disallowed address never take a slot: each is closed at
    accept and logged with its address; the allowed PACS gets through."""
    listener, _ = node(allowed_addresses=["127.0.0.1"], max_associations=10)
    held = [half_open(listener.port, "127.0.0.2") for _ in range(10)]
    try:
        assert all(closed_by_node(s) for s in held)
        assert echo_ok(listener.port)
    finally:
        for s in held:
            s.close()
    events = [e for e in logs if e["event"] == "connection_refused"]
    assert len(events) == 10 and {e["address"] for e in events} == {"127.0.0.2"}
    assert {e["reason"] for e in events} == {"source address not allowed"}


def test_connect_close_cycles_do_not_lock_out(node, logs):
    listener, _ = node(max_associations=10, max_associations_per_address=5)
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", listener.port), timeout=10)
        if i % 2:
            s.sendall(HALF_OPEN_RQ)
        s.close()
    # Slots are given back as each connection ends: poll (no timing asserted) until every connection
    # has been accepted (or refused) and has ended.
    deadline = time.monotonic() + 30
    guard = listener._guard
    while (guard.decisions < 50 or guard.open_connections()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert listener._guard.open_connections() == {}
    assert echo_ok(listener.port)
    assert store_one(listener.port, make_dx()).Status == 0x0000


def test_slow_pdu_is_cut_at_the_read_deadline(node, logs):
    """A peer that trickles a PDU one byte at a time (each byte inside the socket timeout) is cut
    when the whole PDU has not arrived within network_timeout_s."""
    listener, _ = node(acse_timeout_s=60.0, network_timeout_s=1.0)
    s = half_open(listener.port, "127.0.0.2", payload=b"")
    try:
        closed = False
        deadline = time.monotonic() + 30
        for byte in HALF_OPEN_RQ * 20:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            s.settimeout(0.3)
            if closed_by_node(s):
                closed = True
                break
            if time.monotonic() > deadline:
                break
        assert closed
    finally:
        s.close()
    assert echo_ok(listener.port)
