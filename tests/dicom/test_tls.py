"""DICOM TLS: the TLS listener beside the plain one, mutual authentication with certificates tied to
calling AE titles, and real peers (DCMTK storescu +tls to the node, the node's SR to storescp +tls).
Certificates are made by the test (tests/support/tls_certs.py, openssl command line)."""

from __future__ import annotations

import dataclasses
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from screener.config import Destination, NodeSettings, Settings, TlsPeer, TlsSettings
from screener.dicom import tls as tlsmod
from screener.dicom.listener import Listener
from screener.dicom.sender import send_file
from screener.store import Store
from tests.dicom.test_listener import DX, make_dx
from tests.support.tls_certs import Pki, needs_openssl

pytestmark = needs_openssl

needs_dcmtk_tls = pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("storescp") is None,
    reason="dcmtk (storescu, storescp with TLS) not installed: apt-get install dcmtk",
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Pki, **kw) -> TlsSettings:
    base = dict(
        certificate=str(pki.node.cert),
        private_key=str(pki.node.key),
        ca_file=str(pki.ca.cert),
        listen=True,
        port=0,
    )
    base.update(kw)
    return TlsSettings(**base)  # type: ignore[arg-type]


@pytest.fixture
def tls_node(tmp_path, pki):
    started = []

    def make(node_kw=None, **tls_kw):
        kw = dict(
            ae_title="CSPINE",
            host="127.0.0.1",
            port=0,
            var_dir=str(tmp_path / "var"),
            min_free_mb=0,
            acse_timeout_s=10,
            dimse_timeout_s=10,
            network_timeout_s=10,
        )
        kw.update(node_kw or {})
        node = NodeSettings(**kw)  # type: ignore[arg-type]
        settings = Settings(node=node, tls=tls_settings(pki, **tls_kw))
        store = Store.open(tmp_path / f"var{len(started)}")
        listener = Listener(settings, store)
        listener.start()
        started.append((listener, store))
        return listener, store

    yield make
    for listener, store in started:
        listener.stop()
        store.close()


def client_ctx(pki: Pki, cert=None) -> ssl.SSLContext:
    """A TLS client as a modality would be: trusts the test CA, presents `cert` (or none)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.ca.cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


def tls_associate(port: int, ctx: ssl.SSLContext | None, calling: str = "MODALITY", contexts=None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop, tss in contexts or [(DX, [ExplicitVRLittleEndian]), (Verification, [ExplicitVRLittleEndian])]:
        ae.add_requested_context(sop, tss)
    return ae.associate("127.0.0.1", port, ae_title="CSPINE", tls_args=(ctx, "localhost") if ctx else None)


def test_contexts_follow_bcp195(pki):
    server = tlsmod.server_context(tls_settings(pki))
    client = tlsmod.client_context(tls_settings(pki))
    for ctx in (server, client):
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        names = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert names and all(("GCM" in n or "CHACHA20" in n) and ("ECDHE" in n or "DHE" in n) for n in names)
    assert server.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


def test_tls_and_plain_listeners_side_by_side(tls_node, pki):
    listener, store = tls_node()
    assert listener.port != listener.tls_port
    ds = make_dx()
    assoc = tls_associate(listener.tls_port, client_ctx(pki, pki.modality))
    assert assoc.is_established
    assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    assert assoc.dul.socket.socket.version() in ("TLSv1.2", "TLSv1.3")
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert store.get_instance(ds.SOPInstanceUID) is not None
    plain = tls_associate(listener.port, None)  # the plain listener still serves
    assert plain.is_established and plain.send_c_echo().Status == 0
    plain.release()


def test_untrusted_or_missing_client_certificate_refused(tls_node, pki):
    listener, store = tls_node()
    with capture_logs() as logs:
        rogue = tls_associate(listener.tls_port, client_ctx(pki, pki.rogue))
        none = tls_associate(listener.tls_port, client_ctx(pki, None))
        plain_to_tls = tls_associate(listener.tls_port, None)  # a plain DICOM peer on the TLS port
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sum(e["event"] == "tls_refused" for e in logs) < 3:
            time.sleep(0.05)
    assert not rogue.is_established and not none.is_established and not plain_to_tls.is_established
    refused = [e for e in logs if e["event"] == "tls_refused"]
    assert len(refused) == 3 and {e["address"] for e in refused} == {"127.0.0.1"}
    # The node keeps serving trusted peers.
    ok = tls_associate(listener.tls_port, client_ctx(pki, pki.modality))
    assert ok.is_established
    ok.release()


def test_client_must_trust_the_node(tls_node, pki):
    listener, _ = tls_node()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.rogue_ca.cert))
    ctx.load_cert_chain(str(pki.modality.cert), str(pki.modality.key))
    assert not tls_associate(listener.tls_port, ctx).is_established


def test_certificate_tied_to_calling_aet(tls_node, pki):
    peers = [
        TlsPeer("PACS", fingerprint_sha256=pki.pacs.fingerprint_sha256),
        TlsPeer("XRAY1", subject_cn="modality.test"),
    ]
    listener, _ = tls_node(peers=peers)
    with capture_logs() as logs:
        ok = tls_associate(listener.tls_port, client_ctx(pki, pki.pacs), calling="PACS")
        assert ok.is_established
        ok.release()
        ok2 = tls_associate(listener.tls_port, client_ctx(pki, pki.modality), calling="XRAY1")
        assert ok2.is_established
        ok2.release()
        # A trusted certificate calling with an AE title registered for another certificate.
        wrong = tls_associate(listener.tls_port, client_ctx(pki, pki.modality), calling="PACS")
        assert wrong.is_rejected
        unknown = tls_associate(listener.tls_port, client_ctx(pki, pki.pacs), calling="OTHER")
        assert unknown.is_rejected
    refused = [e for e in logs if e["event"] == "association_refused"]
    assert [e["calling_aet"] for e in refused] == ["PACS", "OTHER"]
    assert refused[0]["certificate_cn"] == "modality.test" and "certificate" in refused[0]["reason"]


def test_tls_only_listener(tls_node, pki):
    listener, _ = tls_node(plain_listener=False)
    assert listener.port == listener.tls_port
    assoc = tls_associate(listener.port, client_ctx(pki, pki.modality))
    assert assoc.is_established
    assoc.release()


def test_silent_tls_client_does_not_block_the_accept_loop(tls_node, pki):
    """A TCP connection to the TLS port that never starts the handshake must not hold up the next
    peer (the handshake runs in the connection's thread, under a deadline)."""
    listener, _ = tls_node(node_kw={"acse_timeout_s": 2.0})
    with capture_logs() as logs:
        silent = socket.create_connection(("127.0.0.1", listener.tls_port))
        try:
            ok = tls_associate(listener.tls_port, client_ctx(pki, pki.modality))
            assert ok.is_established
            ok.release()
            silent.settimeout(30)
            assert silent.recv(1) == b""  # closed by the node at its deadline
        finally:
            silent.close()
    assert any(e["event"] == "connection_timeout" and e["address"] == "127.0.0.1" for e in logs)


# -- real peers: DCMTK --------------------------------------------------------------------------


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@needs_dcmtk_tls
def test_dcmtk_storescu_tls_to_node(tls_node, pki, tmp_path):
    listener, store = tls_node()
    ds = make_dx()
    path = tmp_path / "dx.dcm"
    ds.save_as(path, enforce_file_format=True)
    base = ["storescu", "-aet", "DCMTKTLS", "-aec", "CSPINE", "+cf", str(pki.ca.cert)]
    r = _run(
        [*base, "+tls", str(pki.modality.key), str(pki.modality.cert), "127.0.0.1", str(listener.tls_port), str(path)]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    row = store.get_instance(ds.SOPInstanceUID)
    assert row is not None and row.calling_aet == "DCMTKTLS"
    assert pydicom.dcmread(store.abs_path(row.path)).SOPInstanceUID == ds.SOPInstanceUID
    # A storescu whose certificate is signed by a CA the node does not trust gets nothing in.
    bad = make_dx()
    bad_path = tmp_path / "bad.dcm"
    bad.save_as(bad_path, enforce_file_format=True)
    r = _run(
        [*base, "+tls", str(pki.rogue.key), str(pki.rogue.cert), "127.0.0.1", str(listener.tls_port), str(bad_path)]
    )
    assert r.returncode != 0
    assert store.get_instance(bad.SOPInstanceUID) is None


def make_sr_file(path: Path) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName = "Tls^Test"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return ds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StoreScp:
    """DCMTK storescp with TLS (BCP 195 non-downgrading profile, peer certificate required)."""

    def __init__(self, folder: Path, cert, ca: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "-aet", "TLSPACS", "+tls", str(cert.key), str(cert.cert), "+cf", str(ca),
             "-od", str(folder), str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError("storescp did not start")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
        return out or ""


@needs_dcmtk_tls
def test_node_sends_sr_to_dcmtk_storescp_over_tls(pki, tmp_path):
    sr = tmp_path / "sr.dcm"
    ds = make_sr_file(sr)
    scp = StoreScp(tmp_path / "received", pki.pacs, pki.ca.cert)
    try:
        tls = tls_settings(pki, listen=False)
        dest = Destination("TLSPACS", "127.0.0.1", scp.port, tls=True)
        ok, error = send_file(sr, dest, "CSPINE", timeout_s=20, tls=tls)
        assert ok, error
        # An outbox row written as a plain string is sent over TLS when the configured destination says so.
        sr2 = tmp_path / "sr2.dcm"
        make_sr_file(sr2)
        ok, error = send_file(sr2, f"TLSPACS@127.0.0.1:{scp.port}", "CSPINE", timeout_s=20, tls=tls, known=[dest])
        assert ok, error
        # The node refuses a PACS whose certificate it cannot verify (trusting only the rogue CA).
        rogue_trust = dataclasses.replace(tls, ca_file=str(pki.rogue_ca.cert))
        ok, error = send_file(sr, dest, "CSPINE", timeout_s=20, tls=rogue_trust)
        assert not ok and "TLSPACS" in error
        # And over plain TCP the TLS port gets nowhere.
        ok, _ = send_file(sr, dataclasses.replace(dest, tls=False), "CSPINE", timeout_s=5)
        assert not ok
    finally:
        log = scp.stop()
    files = [p for p in (tmp_path / "received").iterdir() if p.is_file()]
    assert len(files) == 2, log
    assert ds.SOPInstanceUID in {pydicom.dcmread(f).SOPInstanceUID for f in files}


@needs_dcmtk_tls
def test_storescp_refuses_node_with_untrusted_certificate(pki, tmp_path):
    """The PACS side of mutual authentication: a node presenting a certificate the PACS does not
    trust is refused."""
    sr = tmp_path / "sr.dcm"
    make_sr_file(sr)
    scp = StoreScp(tmp_path / "received", pki.pacs, pki.ca.cert)
    try:
        tls = tls_settings(pki, listen=False, certificate=str(pki.rogue.cert), private_key=str(pki.rogue.key))
        ok, _ = send_file(sr, Destination("TLSPACS", "127.0.0.1", scp.port, tls=True), "CSPINE", timeout_s=20, tls=tls)
        assert not ok
    finally:
        scp.stop()
    assert not any(p.is_file() for p in (tmp_path / "received").iterdir())
