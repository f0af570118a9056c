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

Connections (`GuardedServer`, one per listening port, sharing one `ConnectionGuard`)
------------------------------------------------------------------------------------
Checked when the TCP connection is accepted, before it gets a thread or a slot; a refused
connection is closed at once and logged (``connection_refused``) with its address and reason:
  * source address not in ``node.allowed_addresses`` (IP addresses or CIDR networks; empty = any);
  * already ``node.max_associations_per_address`` connections open from that address;
  * already ``node.max_associations`` connections open in all.
An accepted connection must complete the TLS handshake (TLS listener) and association negotiation
within ``node.acse_timeout_s`` of being accepted, and every PDU must arrive whole within
``node.network_timeout_s`` of its first byte (plus its length at 2 Mbit/s, for a large P-DATA
PDU); otherwise the connection is closed and logged
(``connection_timeout`` / ``tls_refused``, with the address). Ten silent or half-open
connections therefore hold at most their own address's slots, for at most ``acse_timeout_s``.

Access control, checked in an EVT_REQUESTED handler before negotiation, each refusal logged with
the peer address and AE titles (never patient data) and answered with A-ASSOCIATE-RJ
(rejected-permanent, service-user):
  * source address not in ``node.allowed_addresses`` -> diagnostic 1 (also refused at accept);
  * calling AE title not in ``node.allowed_calling_aets`` (empty = any) -> diagnostic 3;
  * on the TLS listener with ``tls.peers`` set: the client certificate is not the one listed for
    the calling AE title -> diagnostic 3;
  * called AE title not ours -> diagnostic 7 (``require_called_aet`` is also set on the AE).

DICOM TLS: with ``tls.listen`` a second listener on ``tls.port`` (BCP 195 profile, see
`screener.dicom.tls`) runs beside the plain one on ``node.port`` (``tls.plain_listener = false``
leaves only the TLS one). The TLS handshake runs in the connection's own thread, never in the
accept loop.

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
import os
import socket
import socketserver
import sqlite3
import ssl
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
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from screener import metrics
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


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConnectionGuard:
    """Slots for open connections: total and per source address, taken at accept, given back when
    the connection's thread ends. Thread-safe; shared by the plain and the TLS listener."""

    def __init__(self, networks: list[Network], max_total: int, max_per_address: int) -> None:
        self.networks = networks
        self.max_total = max_total
        self.max_per_address = max_per_address
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self.decisions = 0  # connections admitted or refused so far (for tests and metrics)

    def admit(self, address: str) -> str:
        """Take a slot for `address`; '' when admitted, else the reason for the refusal."""
        with self._lock:
            self.decisions += 1
            if not address_allowed(address, self.networks):
                return "source address not allowed"
            if self._open.get(address, 0) >= self.max_per_address:
                return "too many connections from this address"
            if sum(self._open.values()) >= self.max_total:
                return "association limit reached"
            self._open[address] = self._open.get(address, 0) + 1
        return ""

    def release(self, address: str) -> None:
        with self._lock:
            n = self._open.get(address, 0) - 1
            if n > 0:
                self._open[address] = n
            else:
                self._open.pop(address, None)

    def open_connections(self) -> dict[str, int]:
        with self._lock:
            return dict(self._open)


# A PDU body may be large (we announce no maximum PDU length, so a sender may put a whole image in
# one P-DATA-TF): its deadline grows with its announced length at this minimum rate (2 Mbit/s).
MIN_PDU_RATE_BYTES_S = 256 * 1024
# Up to 1 MiB per recv (the kernel returns what its buffer holds): every recv gives up the interpreter
# lock and must win it back, and while a batch is being screened other threads hold it, so 64 KiB
# reads (128 per 8 MB image) slowed receiving by a third on a busy node.
_RECV_CHUNK = 1 << 20


def _deadline_recv(sock: Any, seconds: float, idle_timeout: float | None) -> Callable[[int], Any]:
    """A replacement for AssociationSocket.recv: the whole read (one PDU header, or one PDU body)
    must arrive within `seconds` (plus its length at `MIN_PDU_RATE_BYTES_S`), however slowly the
    peer trickles it. A timeout ends the association as a closed connection (pynetdicom turns
    OSError into Evt17). Before an association is established, the negotiation deadline
    (acse_timeout_s) bounds an A-ASSOCIATE-RQ whatever length it announces."""

    def recv(nr_bytes: int) -> bytearray:
        deadline = time.monotonic() + seconds + nr_bytes / MIN_PDU_RATE_BYTES_S
        data = bytearray()
        conn = sock.socket
        try:
            while len(data) < nr_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("PDU read deadline passed")
                conn.settimeout(remaining)
                chunk = conn.recv(min(_RECV_CHUNK, nr_bytes - len(data)))
                if not chunk:
                    return data
                data.extend(chunk)
            return data
        finally:
            try:
                conn.settimeout(idle_timeout)  # sends keep a bounded, not a shrinking, timeout
            except OSError:
                pass

    return recv


def _shutdown(sock: socket.socket) -> None:
    """Shut the connection down under any thread blocked on it (TLS or not): shutdown() on a
    duplicate descriptor acts on the same kernel socket and bypasses the SSL layer's state."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return
        dup = socket.socket(fileno=os.dup(fd))
        try:
            dup.shutdown(socket.SHUT_RDWR)
        finally:
            dup.close()
    except OSError:
        pass


def _peer_closed(sock: socket.socket) -> bool:
    """True when the peer has closed the connection (EOF or error pending), read without consuming
    anything (a peek on a duplicate descriptor, below any TLS layer)."""
    try:
        fd = sock.fileno()
        if fd < 0:
            return True
        dup = socket.socket(fileno=os.dup(fd))
        try:
            return dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        finally:
            dup.close()
    except BlockingIOError:
        return False
    except OSError:
        return True


class _Connection:
    """One accepted connection, as the negotiation watchdog sees it."""

    def __init__(self, raw: socket.socket, address: str) -> None:
        self.raw = raw
        self.address = address
        self.assoc: Any = None
        self.expired = False


class _GuardedHandler(RequestHandler):
    """pynetdicom's request handler, run in the connection's thread until the association ends, with
    the whole-PDU read deadline installed on its socket."""

    def __init__(self, request: Any, client_address: Any, server: Any, conn: _Connection) -> None:
        self.conn = conn
        super().__init__(request, client_address, server)

    def handle(self) -> None:
        server: GuardedServer = self.server  # type: ignore[assignment]
        assoc = self._create_association()
        sock: Any = assoc.dul.socket  # pynetdicom AssociationSocket; its recv gets the PDU deadline
        sock.recv = _deadline_recv(sock, server.pdu_timeout_s, server.pdu_timeout_s)
        self.conn.assoc = assoc
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        # Until the A-ASSOCIATE-RQ arrives, pynetdicom waits for it for acse_timeout even when the peer
        # has already gone: notice the closed connection and end the association now, so that
        # connect/close cycles give their slot back at once.
        while assoc.is_alive() and assoc.requestor.primitive is None:
            assoc.join(0.1)
            if assoc.is_alive() and assoc.requestor.primitive is None and _peer_closed(self.conn.raw):
                assoc.dul.to_user_queue.put(None)  # run_reactor treats "no request" as the end
                break
        assoc.join()


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with admission at accept (`ConnectionGuard`), the TLS handshake
    and association negotiation under a deadline, in the connection's own thread."""

    # socketserver's default listen backlog is 5: a burst of connections (a flood, or a PACS
    # opening several at once) would have SYNs dropped and retried a second later.
    request_queue_size = 128

    def __init__(
        self,
        *args: Any,
        guard: ConnectionGuard,
        tls_context: ssl.SSLContext | None,
        negotiation_timeout_s: float,
        pdu_timeout_s: float,
        listener_name: str,
        **kwargs: Any,
    ) -> None:
        self.guard = guard
        self.tls_context = tls_context
        self.negotiation_timeout_s = negotiation_timeout_s
        self.pdu_timeout_s = pdu_timeout_s
        self.listener_name = listener_name
        self._conns: set[_Connection] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)  # ssl_context stays None: the accept loop never handshakes

    def shutdown(self) -> None:
        """Stop accepting, end every open connection (A-ABORT for an established association),
        then close the listening socket. Never waits for a silent peer."""
        socketserver.BaseServer.shutdown(self)
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            conn.expired = True
            a = conn.assoc
            if a is not None and a.is_established:
                a.abort()
            _shutdown(conn.raw)
            if a is not None:
                a.kill()
        self.server_close()
        if self in self.ae._servers:
            self.ae._servers.remove(self)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        address = str(client_address[0])
        reason = self.guard.admit(address)
        if reason:
            log.warning("connection_refused", address=address, listener=self.listener_name, reason=reason)
            metrics.association_refused(reason)
            return False
        return True

    def _expire(self, conn: _Connection) -> None:
        a = conn.assoc
        if a is not None and (a.is_established or a.is_released or a.is_aborted or a.is_rejected):
            return
        conn.expired = True
        metrics.association_refused("negotiation timeout")
        log.warning(
            "connection_timeout",
            address=conn.address,
            listener=self.listener_name,
            reason="TLS handshake and association negotiation not complete in time",
            timeout_s=self.negotiation_timeout_s,
        )
        _shutdown(conn.raw)  # wakes a recv or a handshake blocked in another thread
        if a is not None:
            a.kill()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        conn = _Connection(request, address)
        with self._conns_lock:
            self._conns.add(conn)
        timer = threading.Timer(self.negotiation_timeout_s, self._expire, (conn,))
        timer.daemon = True
        timer.start()
        try:
            sock = request
            request.settimeout(self.pdu_timeout_s)
            if self.tls_context is not None:
                try:
                    sock = self.tls_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
                    conn.raw = sock  # wrap_socket detached `request`: the watchdog must see this one
                    sock.do_handshake()
                except (OSError, ValueError) as exc:
                    if not conn.expired:
                        reason = getattr(exc, "reason", None) or type(exc).__name__
                        log.warning("tls_refused", address=address, listener=self.listener_name, reason=str(reason))
                        metrics.association_refused("tls handshake")
                    return
            _GuardedHandler(sock, client_address, self, conn)
        except Exception as exc:  # noqa: BLE001 - one connection never takes the server down
            log.error("connection_failed", address=address, error_type=type(exc).__name__)
        finally:
            timer.cancel()
            with self._conns_lock:
                self._conns.discard(conn)
            self.guard.release(address)
            try:
                conn.raw.close()
            except OSError:
                pass


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
        node = settings.node
        self._networks = _parse_networks(list(node.allowed_addresses))
        self._calling = {a.strip() for a in node.allowed_calling_aets}
        self._ae_title = node.ae_title.strip()
        self._guard = ConnectionGuard(
            self._networks, node.max_associations, min(node.max_associations, node.max_associations_per_address)
        )
        self._tls_context: ssl.SSLContext | None = None
        if settings.tls.listen:
            from screener.dicom.tls import server_context

            self._tls_context = server_context(settings.tls)
        self._server: Any = None  # the plain listener (None when only TLS runs)
        self._tls_server: Any = None
        self._servers: list[Any] = []
        self._lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------------

    def _serve(self, port: int, tls_context: ssl.SSLContext | None, name: str) -> Any:
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        node = self.settings.node
        server = self.ae.make_server(
            (node.host, port),
            evt_handlers=handlers,
            server_class=GuardedServer,
            guard=self._guard,
            tls_context=tls_context,
            negotiation_timeout_s=node.acse_timeout_s,
            pdu_timeout_s=node.network_timeout_s,
            listener_name=name,
        )
        thread = threading.Thread(target=server.serve_forever, name=f"screener-{name}-listener", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # what AE.start_server does; server.shutdown() removes it
        return server

    def start(self) -> None:
        """Start listening (non-blocking). Raises OSError if a port cannot be bound."""
        with self._lock:
            if self._servers:
                return
            node, tls = self.settings.node, self.settings.tls
            try:
                if not (tls.listen and not tls.plain_listener):
                    self._server = self._serve(node.port, None, "plain")
                    self._servers.append(self._server)
                if tls.listen:
                    self._tls_server = self._serve(tls.port, self._tls_context, "tls")
                    self._servers.append(self._tls_server)
            except BaseException:
                self._stop_servers()
                raise
        log.info(
            "listener_started",
            ae_title=self._ae_title,
            host=node.host,
            port=int(self._server.server_address[1]) if self._server else None,
            tls_port=self.tls_port if self._tls_server else None,
            max_associations=node.max_associations,
            max_associations_per_address=node.max_associations_per_address,
        )

    def _stop_servers(self) -> list[Any]:
        servers, self._servers = self._servers, []
        self._server = self._tls_server = None
        for server in servers:
            server.shutdown()
            for assoc in list(server.active_associations):
                assoc.abort()
        return servers

    def stop(self) -> None:
        """Stop accepting, abort associations still open on these servers, close the sockets."""
        with self._lock:
            stopped = self._stop_servers()
        if stopped:
            log.info("listener_stopped", ae_title=self._ae_title)

    @property
    def port(self) -> int:
        """The bound TCP port of the plain listener (of the TLS one when it runs alone); the
        OS-assigned one when the configured port is 0."""
        server = self._server or self._tls_server
        if server is None:
            raise RuntimeError("listener is not started")
        return int(server.server_address[1])

    @property
    def tls_port(self) -> int:
        """The bound TCP port of the TLS listener."""
        if self._tls_server is None:
            raise RuntimeError("the TLS listener is not running")
        return int(self._tls_server.server_address[1])

    @property
    def running(self) -> bool:
        return bool(self._servers)

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
        identity = None
        sock = getattr(assoc.dul.socket, "socket", None)
        if isinstance(sock, ssl.SSLSocket):
            from screener.dicom.tls import peer_allowed, peer_identity

            identity = peer_identity(sock)
        if not address_allowed(address, self._networks):
            reason, diagnostic = "source address not allowed", 0x01
        elif self._calling and calling not in self._calling:
            reason, diagnostic = "calling AE title not allowed", 0x03
        elif isinstance(sock, ssl.SSLSocket) and not peer_allowed(calling, identity, self.settings.tls.peers):
            reason, diagnostic = "client certificate not registered for this calling AE title", 0x03
        elif called != self._ae_title:
            reason, diagnostic = "called AE title is not ours", 0x07
        if not reason:
            return
        metrics.association_refused(reason)
        extra = {}
        if identity is not None:
            extra = {"certificate_cn": identity.subject_cn, "certificate_sha256": identity.fingerprint_sha256}
        log.warning(
            "association_refused",
            address=address,
            calling_aet=calling,
            called_aet=called,
            reason=reason,
            **extra,
        )
        # Rejected-permanent, by the service user. pynetdicom skips negotiation once is_rejected is
        # set by send_reject; kill() waits for the peer to close (or the ARTIM timer).
        assoc.acse.send_reject(0x01, 0x01, diagnostic)
        assoc.kill()

    def _on_accepted(self, event: Any) -> None:
        assoc = event.assoc
        metrics.association_accepted()
        log.info(
            "association_accepted",
            address=str(assoc.requestor.address),
            calling_aet=_text(assoc.requestor.ae_title),
            accepted_contexts=len(assoc.accepted_contexts),
            rejected_contexts=len(assoc.rejected_contexts),
            rejected_sop_classes=len({str(cx.abstract_syntax) for cx in assoc.rejected_contexts}),
        )

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        rsp = assoc.acceptor.primitive
        metrics.association_rejected(
            getattr(rsp, "result", None), getattr(rsp, "result_source", None), getattr(rsp, "diagnostic", None)
        )
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
            metrics.instance_refused(INTERNAL_ERROR)
            return _status(INTERNAL_ERROR, "internal error")

    def _refuse(self, code: int, reason: str, **uids: str) -> Dataset:
        metrics.instance_refused(code)
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
        metrics.instance_stored(outcome.size)
        if self.on_stored is not None:
            try:
                self.on_stored(study_uid)
            except Exception as exc:
                log.error("on_stored_failed", study_uid=study_uid, error_type=type(exc).__name__)
        return SUCCESS
