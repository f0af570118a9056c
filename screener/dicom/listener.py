"""The DICOM listener: pynetdicom Verification SCP and Storage SCP for CR and DX images.

What is accepted
----------------
SOP classes: Verification (1.2.840.10008.1.1); CR Image Storage (1.2.840.10008.5.1.4.1.1.1),
DX Image Storage for Presentation (1.2.840.10008.5.1.4.1.1.1.1) and for Processing
(1.2.840.10008.5.1.4.1.1.1.1.1), each with the uncompressed and compressed transfer syntaxes of
`TRANSFER_SYNTAXES` (receiving needs no codec: the bytes are stored as sent).

Any other SOP class (a CT image, an SR, ...) is refused at association negotiation: its
presentation context is answered "abstract syntax not supported", the association itself is still
accepted for the contexts we do support, and the node keeps serving. A sender never gets as far as
a C-STORE for it: storescu reports "No presentation context for: CTImageStorage"; pynetdicom's
SCU aborts an association in which no context was accepted, and its ``send_c_store`` raises
ValueError for the refused class inside a mixed association. The ``association_accepted`` log event
lists the refused SOP classes. That is the standard way to refuse a SOP class and keeps
auto-forwarding PACS rules from queueing retries of images this node will never screen.

Access control, checked in an EVT_REQUESTED handler before negotiation, each refusal logged with
the peer address and AE titles (never patient data) and answered with A-ASSOCIATE-RJ
(rejected-permanent, service-user):
  * source address not in ``node.allowed_addresses`` (IP addresses or CIDR networks; empty = any)
    -> diagnostic 1 "no reason given";
  * calling AE title not in ``node.allowed_calling_aets`` (empty = any) -> diagnostic 3;
  * called AE title not ours -> diagnostic 7 (``require_called_aet`` is also set on the AE).
pynetdicom itself rejects (rejected-transient, local limit exceeded) beyond
``node.max_associations``.

C-STORE statuses
----------------
The handler never decodes pixel data and never runs inference. It reads only the header elements
up to (0020,000E) Series Instance UID from the received bytes, stores the Part 10 bytes durably
(`Store.store_instance`: file fsynced and renamed, row committed) and only then answers success.

======  ===============================  ======================================================
Status  Meaning (PS3.4 category)         When
======  ===============================  ======================================================
0x0000  Success                          stored durably (also for a repeated SOP Instance UID)
0x0122  Refused: SOP class not supported the request's Affected SOP Class is not CR/DX
0xA700  Refused: out of resources        free space under ``node.min_free_mb``, writing the
                                         spool file failed (OSError), or the database could not
                                         record it (sqlite3 error); the Error Comment says which
0xA900  Error: data set does not match   the data set's SOP Class UID differs from the request's
        SOP class
0xC001  Error: cannot understand         the data set cannot be parsed
0xC002  Error: cannot understand         Study Instance UID missing, empty or not a valid UID
0xC003  Error: cannot understand         Affected SOP Instance UID missing or not a valid UID
0xC004  Error: cannot understand         the data set's SOP Instance UID differs from the request's
0xC005  Error: cannot understand         Series Instance UID missing, empty or not a valid UID
0xC010  Error: cannot understand         Deflated data set inflates beyond ``limits.max_dataset_mb``
                                         (a deflate bomb: never stored, never acknowledged)
0xC211  Error: cannot understand         unexpected error in the handler (logged; pynetdicom's code)
======  ===============================  ======================================================

Failure responses carry an Error Comment (0000,0902). A7xx tells the sender to retry later; A9xx
and Cxxx tell it that resending the same object will not help. A rejected object is never stored.
UIDs must be valid DICOM UIDs (digits and dots, at most 64 characters): they name spool folders
and files, so a malformed one is refused rather than sanitised.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from screener.config import LimitSettings, Settings
from screener.dicom.image import SCREENED_SOP_CLASSES, inflated_size_within
from screener.errors import ConfigError
from screener.logs import get_logger
from screener.store import Store, is_valid_uid

log = get_logger("screener.dicom.listener")

STORAGE_SOP_CLASSES = SCREENED_SOP_CLASSES

TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (8 bit)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (12 bit)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14 SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_PARSE = 0xC001
BAD_STUDY_UID = 0xC002
BAD_SOP_INSTANCE_UID = 0xC003
SOP_INSTANCE_UID_MISMATCH = 0xC004
BAD_SERIES_UID = 0xC005
INFLATED_TOO_LARGE = 0xC010
INTERNAL_ERROR = 0xC211

# Header elements read from a received data set: everything up to Series Instance UID.
_LAST_HEADER_TAG = 0x0020000E


def _stop_after_series(tag: Any, _vr: Any, _length: int) -> bool:
    return int(tag) > _LAST_HEADER_TAG


class InflateLimitError(ValueError):
    """A Deflated data set inflates beyond ``limits.max_dataset_mb`` (a deflate bomb)."""


_HEADER_PREFIX = 16 << 20  # inflated bytes in which the header elements must lie


def read_header(encoded: bytes, transfer_syntax: str, max_inflated: int | None = None) -> Dataset:
    """Parse only the elements up to (0020,000E) of a data set as received (no file meta), never
    touching the pixel data. Raises on data that cannot be parsed. A Deflated data set is first
    inflated in discarded chunks to check its full size against `max_inflated` (default: the
    [limits] default), raising `InflateLimitError` beyond; only its first 16 MiB are kept."""
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        limit = max_inflated if max_inflated is not None else LimitSettings().max_dataset_bytes
        try:
            inflated_size_within(encoded, limit)
        except ValueError:
            raise InflateLimitError("inflated data set exceeds the limit") from None
        data = zlib.decompressobj(-zlib.MAX_WBITS).decompress(encoded, _HEADER_PREFIX)
        implicit, little = False, True
    else:
        data = encoded
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
    ds = read_dataset(BytesIO(data), implicit, little, stop_when=_stop_after_series)
    # Force conversion of the values we use so that malformed ones raise here.
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        ds.get(keyword)
    return ds


def _text(value: Any) -> str:
    """A UID or AE title as text; anything that is not a single string (a number read from a
    wrong VR, a multi-value) gives '' so that it fails validation."""
    if not isinstance(value, str):
        return ""
    return value.strip().rstrip("\x00").strip()


def _status(code: int, comment: str = "") -> Dataset:
    rsp = Dataset()
    rsp.Status = code
    if comment:
        rsp.ErrorComment = comment[:64]
    return rsp


def _parse_networks(entries: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for i, entry in enumerate(entries):
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"node.allowed_addresses[{i}]: {entry!r} is not an IP address or network (e.g. 10.0.0.0/8)"
            ) from None
    return nets


def address_allowed(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """True when `networks` is empty or `address` lies in one of them (IPv4-mapped IPv6 handled)."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def build_ae(settings: Settings) -> AE:
    """An AE with Verification and CR/DX Storage (all of `TRANSFER_SYNTAXES`), unlimited PDU size,
    association limit, timeouts and AE-title checks from ``settings.node``."""
    node = settings.node
    # Identifiers of query/retrieve requests could carry patient data: never log them.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    ae = AE(ae_title=node.ae_title)
    ae.maximum_pdu_size = 0  # unlimited: 40-60 % faster than the 16 KB default for large DX
    ae.maximum_associations = node.max_associations
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    ae.require_called_aet = True
    ae.require_calling_aet = [a.strip() for a in node.allowed_calling_aets]
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae


class Listener:
    """Runs the AE's server in background threads. `on_stored(study_uid)` is called (from the
    association thread, exceptions logged and swallowed) after every successful C-STORE, so the
    scheduler can be nudged; keep it quick (e.g. set a threading.Event)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        on_stored: Callable[[str], None] | None = None,
        *,
        ae: AE | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_stored = on_stored
        self.ae = ae if ae is not None else build_ae(settings)
        self._networks = _parse_networks(list(settings.node.allowed_addresses))
        self._calling = {a.strip() for a in settings.node.allowed_calling_aets}
        self._ae_title = settings.node.ae_title.strip()
        self._server: Any = None
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start listening (non-blocking). Raises OSError if the port cannot be bound."""
        with self._lock:
            if self._server is not None:
                return
            handlers = [
                (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_REJECTED, self._on_rejected),
                (evt.EVT_ABORTED, self._on_aborted),
                (evt.EVT_C_STORE, self._on_c_store),
            ]
            node = self.settings.node
            self._server = self.ae.start_server((node.host, node.port), block=False, evt_handlers=handlers)
        log.info(
            "listener_started",
            ae_title=self._ae_title,
            host=node.host,
            port=self.port,
            max_associations=node.max_associations,
        )

    def stop(self) -> None:
        """Stop accepting, abort associations still open on this server, close the socket."""
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        for assoc in list(server.active_associations):
            assoc.abort()
        log.info("listener_stopped", ae_title=self._ae_title)

    @property
    def port(self) -> int:
        """The bound TCP port (the OS-assigned one when node.port is 0)."""
        if self._server is None:
            raise RuntimeError("listener is not started")
        return int(self._server.server_address[1])

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> Listener:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- association events -----------------------------------------------------------------------

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        address = str(assoc.requestor.address)
        rq = assoc.requestor.primitive
        calling = _text(getattr(rq, "calling_ae_title", ""))
        called = _text(getattr(rq, "called_ae_title", ""))
        reason = ""
        diagnostic = 0x01
        if not address_allowed(address, self._networks):
            reason, diagnostic = "source address not allowed", 0x01
        elif self._calling and calling not in self._calling:
            reason, diagnostic = "calling AE title not allowed", 0x03
        elif called != self._ae_title:
            reason, diagnostic = "called AE title is not ours", 0x07
        if not reason:
            return
        log.warning(
            "association_refused",
            address=address,
            calling_aet=calling,
            called_aet=called,
            reason=reason,
        )
        # Rejected-permanent, by the service user. pynetdicom skips negotiation once is_rejected is
        # set by send_reject; kill() waits for the peer to close (or the ARTIM timer).
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _on_accepted(self, event: Any) -> None:
        assoc = event.assoc
        log.info(
            "association_accepted",
            address=str(assoc.requestor.address),
            calling_aet=_text(assoc.requestor.ae_title),
            accepted_contexts=len(assoc.accepted_contexts),
            rejected_contexts=len(assoc.rejected_contexts),
            rejected_sop_classes=sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts}),
        )

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        rsp = assoc.acceptor.primitive
        log.warning(
            "association_rejected",
            address=str(assoc.requestor.address),
            calling_aet=_text(assoc.requestor.ae_title),
            result=getattr(rsp, "result", None),
            diagnostic=getattr(rsp, "diagnostic", None),
        )

    def _on_aborted(self, event: Any) -> None:
        assoc = event.assoc
        log.info(
            "association_aborted", address=str(assoc.requestor.address), calling_aet=_text(assoc.requestor.ae_title)
        )

    # -- C-STORE ----------------------------------------------------------------------------------

    def _on_c_store(self, event: Any) -> Dataset | int:
        try:
            return self._handle_store(event)
        except Exception as exc:  # never let an exception reach pynetdicom
            tb = exc.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
            # The exception message is not logged: a parser message could quote an element value.
            log.error(
                "store_refused",
                status=f"0x{INTERNAL_ERROR:04X}",
                reason="unexpected error",
                error_type=type(exc).__name__,
                where=where,
            )
            return _status(INTERNAL_ERROR, "internal error")

    def _refuse(self, code: int, reason: str, **uids: str) -> Dataset:
        log.warning("store_refused", status=f"0x{code:04X}", reason=reason, **uids)
        return _status(code, reason)

    def _handle_store(self, event: Any) -> Dataset | int:
        t0 = time.perf_counter()
        req = event.request
        assoc = event.assoc
        calling = _text(assoc.requestor.ae_title)
        address = str(assoc.requestor.address)
        sop_class = _text(req.AffectedSOPClassUID)
        sop_uid = _text(req.AffectedSOPInstanceUID)
        ts = str(event.context.transfer_syntax)
        ids = {"sop_instance_uid": sop_uid, "calling_aet": calling}

        if not is_valid_uid(sop_uid):
            return self._refuse(BAD_SOP_INSTANCE_UID, "SOP Instance UID missing or invalid", calling_aet=calling)
        if sop_class not in STORAGE_SOP_CLASSES:
            return self._refuse(SOP_CLASS_NOT_SUPPORTED, "SOP class not supported", sop_class_uid=sop_class, **ids)

        raw = req.DataSet.getvalue() if req.DataSet is not None else b""
        try:
            hdr = read_header(raw, ts, self.settings.limits.max_dataset_bytes)
            ds_class = _text(hdr.get("SOPClassUID"))
            ds_sop = _text(hdr.get("SOPInstanceUID"))
            study_uid = _text(hdr.get("StudyInstanceUID"))
            series_uid = _text(hdr.get("SeriesInstanceUID"))
        except InflateLimitError:
            return self._refuse(INFLATED_TOO_LARGE, "inflated data set exceeds the size limit", **ids)
        except Exception as exc:
            return self._refuse(CANNOT_PARSE, "data set cannot be parsed", error_type=type(exc).__name__, **ids)
        if ds_class and ds_class != sop_class:
            return self._refuse(
                DATASET_DOES_NOT_MATCH_SOP_CLASS, "SOP Class UID differs from request", sop_class_uid=sop_class, **ids
            )
        if ds_sop and ds_sop != sop_uid:
            return self._refuse(SOP_INSTANCE_UID_MISMATCH, "SOP Instance UID differs from request", **ids)
        if not is_valid_uid(study_uid):
            return self._refuse(BAD_STUDY_UID, "Study Instance UID missing or invalid", **ids)
        if not is_valid_uid(series_uid):
            return self._refuse(BAD_SERIES_UID, "Series Instance UID missing or invalid", study_uid=study_uid, **ids)

        min_free = self.settings.node.min_free_mb
        if not self.store.free_space_ok(min_free):
            return self._refuse(OUT_OF_RESOURCES, f"free disk space below {min_free} MB", study_uid=study_uid, **ids)
        try:
            outcome = self.store.store_instance(
                event.encoded_dataset(),  # preamble + file meta + data set as sent: a Part 10 file
                sop_class_uid=sop_class,
                sop_instance_uid=sop_uid,
                study_uid=study_uid,
                series_uid=series_uid,
                transfer_syntax=ts,
                calling_aet=calling,
                address=address,
            )
        except OSError as exc:
            return self._refuse(
                OUT_OF_RESOURCES,
                f"write failed: {exc.strerror or 'I/O error'}",
                study_uid=study_uid,
                errno=str(exc.errno),
                **ids,
            )
        except sqlite3.Error as exc:
            return self._refuse(
                OUT_OF_RESOURCES, "database error", study_uid=study_uid, error_type=type(exc).__name__, **ids
            )

        log.debug(
            "store_done",
            sop_instance_uid=sop_uid,
            study_uid=study_uid,
            duplicate=outcome.duplicate,
            ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        if self.on_stored is not None:
            try:
                self.on_stored(study_uid)
            except Exception as exc:
                log.error("on_stored_failed", study_uid=study_uid, error_type=type(exc).__name__)
        return SUCCESS
