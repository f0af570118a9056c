"""Sending an SR file: as it is when the peer takes its SOP class and transfer syntax, else read and
converted (another transfer syntax; Comprehensive SR for a PACS without Comprehensive 3D SR).
Whatever the route, the peer receives the same content."""

from __future__ import annotations

import threading

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage  # type: ignore[attr-defined]

from screener.dicom.sender import send_file
from screener.dicom.sr import sr_to_bytes
from tests.dicom.test_sr import build, study_findings  # noqa: F401 - the fixture

IMPLICIT_ONLY = [ImplicitVRLittleEndian]
BOTH = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


class Peer:
    """A storage SCP taking the given (SOP class, transfer syntaxes); keeps what it receives."""

    def __init__(self, contexts: list[tuple[str, list[str]]]) -> None:
        self.received: list[tuple[pydicom.Dataset, str]] = []
        self._lock = threading.Lock()
        ae = AE(ae_title="PEER")
        for sop, syntaxes in contexts:
            ae.add_supported_context(sop, syntaxes)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]

    def _on_store(self, event) -> int:
        with self._lock:
            self.received.append((event.dataset, str(event.context.transfer_syntax)))
        return 0x0000

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def _content(ds: pydicom.Dataset) -> dict:
    """The data set's elements apart from the SOP Class UID (which a conversion may change)."""
    return {el.tag: el.value for el in ds if el.keyword != "SOPClassUID"}


@pytest.mark.parametrize(
    ("contexts", "want_class", "want_syntax"),
    [
        ([(Comprehensive3DSRStorage, BOTH)], Comprehensive3DSRStorage, ExplicitVRLittleEndian),  # as it is
        ([(Comprehensive3DSRStorage, IMPLICIT_ONLY)], Comprehensive3DSRStorage, ImplicitVRLittleEndian),
        ([(ComprehensiveSRStorage, BOTH)], ComprehensiveSRStorage, ExplicitVRLittleEndian),
        ([(ComprehensiveSRStorage, IMPLICIT_ONLY)], ComprehensiveSRStorage, ImplicitVRLittleEndian),
    ],
    ids=["3d-explicit-as-is", "3d-implicit", "comprehensive-explicit", "comprehensive-implicit"],
)
def test_peer_receives_the_same_content(tmp_path, study_findings, contexts, want_class, want_syntax):  # noqa: F811
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_to_bytes(build(study_findings)))
    original = pydicom.dcmread(path)
    with Peer(contexts) as peer:
        ok, error = send_file(path, f"PEER@127.0.0.1:{peer.port}", "CSPINE", timeout_s=20)
        assert ok, error
    ((got, syntax),) = peer.received
    assert (str(got.SOPClassUID), syntax) == (str(want_class), str(want_syntax))
    assert _content(got) == _content(original)


def test_unreadable_file_is_reported_not_sent(tmp_path):
    path = tmp_path / "sr.dcm"
    path.write_bytes(b"not dicom at all")
    with Peer([(Comprehensive3DSRStorage, BOTH)]) as peer:
        ok, error = send_file(path, f"PEER@127.0.0.1:{peer.port}", "CSPINE", timeout_s=20)
    assert not ok and error.startswith("cannot read sr.dcm") and not peer.received


def test_accepted_file_goes_as_it_is_without_decoding(tmp_path, study_findings, monkeypatch):  # noqa: F811
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_to_bytes(build(study_findings)))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the data set was decoded")

    monkeypatch.setattr(pydicom, "dcmread", no_decoding)
    with Peer([(Comprehensive3DSRStorage, BOTH)]) as peer:
        ok, error = send_file(path, f"PEER@127.0.0.1:{peer.port}", "CSPINE", timeout_s=20)
        assert ok, error
    assert len(peer.received) == 1
