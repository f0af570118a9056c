"""C-STORE of a result SR to a destination (pynetdicom SCU), plain or over DICOM TLS.

A destination uses TLS when its configuration says so (``tls = true`` in ``[[destinations]]``, or
``AET@HOST:PORT?tls``); an outbox entry queued before TLS was configured for the same
AE title, host and port is sent over TLS too (never downgraded). Error texts are our own words.

When the peer accepts the file's own SOP class and transfer syntax, the file's bytes go on the
wire as they are (pynetdicom's chunked sending: no decoding and re-encoding of the data set,
which cost the node's Python thread more than building the SR); otherwise (a peer without
Comprehensive 3D SR, or with another transfer syntax) the data set is read and converted.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
)

from screener.config import Destination, TlsSettings, parse_destination
from screener.errors import ConfigError, safe_reason

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
_CHUNKED = threading.Lock()  # pynetdicom's switch for sending a file as it is is process-wide


def resolve(destination: Destination | str, known: Sequence[Destination] = ()) -> Destination:
    """The destination to use for an outbox entry: the configured one with the same AE title, host
    and port when there is one (its TLS flag wins unless the entry itself asks for TLS)."""
    dest = parse_destination(destination) if isinstance(destination, str) else destination
    for d in known:
        if (d.ae_title, d.host, d.port) == (dest.ae_title, dest.host, dest.port):
            return d if d.tls or not dest.tls else dest
    return dest


def send_file(
    path: Path,
    destination: Destination | str,
    calling_aet: str,
    timeout_s: float = 30.0,
    *,
    tls: TlsSettings | None = None,
    known: Sequence[Destination] = (),
) -> tuple[bool, str]:
    """Send one DICOM file. Returns (success, error text). `tls`: the [tls] settings, needed for a
    TLS destination; `known`: the configured destinations (see `resolve`)."""
    try:
        dest = resolve(destination, known)
    except ConfigError:
        return False, "destination is not AET@HOST:PORT"
    tls_args = None
    if dest.tls:
        from screener.dicom.tls import client_context

        if tls is None:
            return False, f"TLS destination {dest}: no [tls] settings"
        try:
            tls_args = (client_context(tls), dest.host)
        except ConfigError as exc:
            return False, f"TLS destination {dest}: {exc}"
    try:
        meta = pydicom.filereader.read_file_meta_info(str(path))
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        file_syntax = str(meta.get("TransferSyntaxUID", ""))
        ds = None if sop_class and file_syntax else pydicom.dcmread(str(path))
    except Exception as exc:  # noqa: BLE001 - any unreadable SR is reported, not raised
        return False, f"cannot read {Path(path).name}: {exc.__class__.__name__}"
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.maximum_pdu_size = 0
    for sop in (Comprehensive3DSRStorage, ComprehensiveSRStorage):
        ae.add_requested_context(sop, TRANSFER_SYNTAXES)
    if ds is not None:
        sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class and sop_class not in (Comprehensive3DSRStorage, ComprehensiveSRStorage):
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)  # a companion (SC / GSPS, issue 14)
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except Exception as exc:  # noqa: BLE001
        return False, safe_reason(exc, f"association to {dest} failed")
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no association"
        if tls_args is not None and not (assoc.is_rejected or assoc.is_aborted):
            reason += " (connection or TLS handshake failed)"
        return False, f"association to {dest} {reason}"
    accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    as_is = ds is None and any(
        cx.abstract_syntax == sop_class and cx.transfer_syntax and cx.transfer_syntax[0] == file_syntax
        for cx in assoc.accepted_contexts
    )
    try:
        if as_is:
            with _CHUNKED:
                saved, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
                try:
                    status = assoc.send_c_store(Path(path))
                finally:
                    _config.STORE_SEND_CHUNKED_DATASET = saved
        else:
            if ds is None:
                ds = pydicom.dcmread(str(path))
            if (
                sop_class == Comprehensive3DSRStorage
                and Comprehensive3DSRStorage not in accepted
                and ComprehensiveSRStorage in accepted
            ):
                # A PACS without Comprehensive 3D SR: the same content is a valid Comprehensive SR (2-D SCOORDs).
                ds.SOPClassUID = ComprehensiveSRStorage
                if "file_meta" in ds:
                    ds.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
            status = assoc.send_c_store(ds)
    except Exception as exc:  # noqa: BLE001
        return False, safe_reason(exc, "C-STORE failed")
    finally:
        assoc.release()
    if not status or "Status" not in status:
        return False, "no C-STORE response (connection lost)"
    code = int(status.Status)
    if code in (0x0000, 0xB000, 0xB007, 0xB006):
        return True, ""
    return False, f"C-STORE status 0x{code:04X}"
