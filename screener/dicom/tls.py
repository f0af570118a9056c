"""DICOM TLS contexts (PS3.15 Annex B, BCP 195 profiles) and client-certificate identities.

Both roles use TLS 1.2 or later and, for TLS 1.2, only forward-secret AEAD cipher suites
(ECDHE/DHE with AES-GCM or ChaCha20-Poly1305); TLS 1.3 suites are all AEAD. Compression and
renegotiation are off. The listener asks for a client certificate signed by ``tls.ca_file``
(mutual authentication) unless ``tls.require_client_certificate`` is false; a destination's
certificate is always verified against ``tls.ca_file`` and, unless ``tls.verify_hostname`` is
false, must name the host we connect to (a subjectAltName DNS name or IP address).
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from typing import Any

from screener.config import TlsPeer, TlsSettings
from screener.errors import ConfigError

# BCP 195 (RFC 9325) recommended TLS 1.2 suites: forward secrecy + AEAD, no CBC, no RSA key exchange.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!SHA1:!DSS:!PSK:!SRP"


def _base(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    if hasattr(ssl, "OP_NO_RENEGOTIATION"):
        ctx.options |= ssl.OP_NO_RENEGOTIATION
    return ctx


def _load(ctx: ssl.SSLContext, tls: TlsSettings, *, need_own: bool) -> None:
    if tls.certificate or need_own:
        try:
            ctx.load_cert_chain(tls.certificate, tls.private_key)
        except FileNotFoundError as exc:
            raise ConfigError(f"tls.certificate / tls.private_key: {exc.filename}: no such file") from None
        except (ssl.SSLError, OSError, ValueError):
            raise ConfigError(
                "tls.certificate / tls.private_key: cannot load them (not PEM, an encrypted key, "
                "or a key that does not belong to the certificate)"
            ) from None
    if tls.ca_file:
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except FileNotFoundError:
            raise ConfigError(f"tls.ca_file: {tls.ca_file}: no such file") from None
        except (ssl.SSLError, OSError, ValueError):
            raise ConfigError(f"tls.ca_file: {tls.ca_file}: not a PEM file of CA certificates") from None


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The listener's context: our certificate and key, peers verified against ca_file."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load(ctx, tls, need_own=True)
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    if not tls.ca_file:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """A destination's context: the server verified against ca_file (and its host name), our
    certificate presented when configured (for a PACS that requires mutual authentication)."""
    if not tls.ca_file:
        raise ConfigError("tls.ca_file: needed to verify a TLS destination's certificate")
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = tls.verify_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, tls, need_own=False)
    return ctx


@dataclass(frozen=True)
class PeerIdentity:
    """What identifies a TLS client: the SHA-256 fingerprint of its certificate (lower-case hex) and
    its subject common name. Certificate identities are not patient data; they may be logged."""

    fingerprint_sha256: str
    subject_cn: str


def peer_identity(sock: Any) -> PeerIdentity | None:
    """The verified client certificate of a TLS socket, or None (plain socket or no certificate)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    der = sock.getpeercert(binary_form=True)
    if not der:
        return None
    info: Any = sock.getpeercert() or {}
    cn = ""
    for rdn in info.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = str(value)
    return PeerIdentity(hashlib.sha256(der).hexdigest(), cn)


def _norm_fp(text: str) -> str:
    return text.replace(":", "").strip().lower()


def peer_allowed(calling_aet: str, identity: PeerIdentity | None, peers: list[TlsPeer]) -> bool:
    """True when `peers` is empty, or an entry for `calling_aet` matches the client certificate."""
    if not peers:
        return True
    if identity is None:
        return False
    for peer in peers:
        if peer.ae_title.strip() != calling_aet:
            continue
        if peer.subject_cn and peer.subject_cn != identity.subject_cn:
            continue
        if peer.fingerprint_sha256 and _norm_fp(peer.fingerprint_sha256) != identity.fingerprint_sha256:
            continue
        return True
    return False
