"""C-STORE of a result SR to a destination (pynetdicom SCU)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
)

from screener.config import Destination, parse_destination

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def send_file(
    path: Path, destination: Destination | str, calling_aet: str, timeout_s: float = 30.0
) -> tuple[bool, str]:
    """Send one DICOM file. Returns (success, error text)."""
    dest = parse_destination(destination) if isinstance(destination, str) else destination
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable SR is reported, not raised
        return False, f"cannot read {Path(path).name}: {exc.__class__.__name__}"
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.maximum_pdu_size = 0
    for sop in (Comprehensive3DSRStorage, ComprehensiveSRStorage):
        ae.add_requested_context(sop, TRANSFER_SYNTAXES)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class and sop_class not in (Comprehensive3DSRStorage, ComprehensiveSRStorage):
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)  # a companion (SC / GSPS, issue 14)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    except Exception as exc:  # noqa: BLE001
        return False, f"association failed: {exc.__class__.__name__}: {exc}"
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no association"
        return False, f"association to {dest.ae_title}@{dest.host}:{dest.port} {reason}"
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    if (
        sop_class == Comprehensive3DSRStorage
        and Comprehensive3DSRStorage not in accepted
        and ComprehensiveSRStorage in accepted
    ):
        # A PACS without Comprehensive 3D SR: the same content is a valid Comprehensive SR (only 2-D SCOORDs).
        ds.SOPClassUID = ComprehensiveSRStorage
        if "file_meta" in ds:
            ds.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    try:
        status = assoc.send_c_store(ds)
    except Exception as exc:  # noqa: BLE001
        return False, f"C-STORE failed: {exc.__class__.__name__}: {exc}"
    finally:
        assoc.release()
    if not status or "Status" not in status:
        return False, "no C-STORE response (connection lost)"
    code = int(status.Status)
    if code in (0x0000, 0xB000, 0xB007, 0xB006):
        return True, ""
    return False, f"C-STORE status 0x{code:04X}"
