"""Test certificates made by the tests themselves with the openssl command line: a test CA, a node
(server) certificate for 127.0.0.1 / localhost, client certificates, and an unrelated CA whose
certificates nobody trusts. RSA 2048 + SHA-256: what every DICOM TLS peer (DCMTK's BCP 195
profiles, Orthanc) accepts."""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command line (apt-get install openssl)")


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path

    @property
    def fingerprint_sha256(self) -> str:
        der = ssl.PEM_cert_to_DER_cert(self.cert.read_text())
        return hashlib.sha256(der).hexdigest()


def _run(*args: str, cwd: Path) -> None:
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(folder: Path, name: str) -> Cert:
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _run("genrsa", "-out", str(key), "2048", cwd=folder)
    _run(
        "req", "-x509", "-new", "-key", str(key), "-sha256", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-out", str(cert), cwd=folder,
    )  # fmt: skip
    key.chmod(0o600)
    return Cert(cert, key)


def make_cert(folder: Path, ca: Cert, name: str, cn: str, *, server: bool) -> Cert:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    ext = folder / f"{name}.ext"
    usage = "serverAuth,clientAuth" if server else "clientAuth"
    lines = [
        "basicConstraints=CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={usage}",
    ]
    if server:
        lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    ext.write_text("\n".join(lines) + "\n")
    _run("genrsa", "-out", str(key), "2048", cwd=folder)
    _run("req", "-new", "-key", str(key), "-subj", f"/CN={cn}", "-out", str(csr), cwd=folder)
    _run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-days", "2", "-sha256", "-extfile", str(ext), "-out", str(cert), cwd=folder,
    )  # fmt: skip
    key.chmod(0o600)
    return Cert(cert, key)


@dataclass(frozen=True)
class Pki:
    ca: Cert
    node: Cert  # the screener's certificate (server and client)
    pacs: Cert  # a trusted PACS / modality (server and client, for 127.0.0.1)
    modality: Cert  # a second trusted client
    rogue_ca: Cert
    rogue: Cert  # signed by the rogue CA: not trusted

    @classmethod
    def create(cls, folder: Path) -> Pki:
        ca = make_ca(folder, "test-ca")
        rogue_ca = make_ca(folder, "rogue-ca")
        return cls(
            ca=ca,
            node=make_cert(folder, ca, "node", "cspine-node", server=True),
            pacs=make_cert(folder, ca, "pacs", "pacs.test", server=True),
            modality=make_cert(folder, ca, "modality", "modality.test", server=False),
            rogue_ca=rogue_ca,
            rogue=make_cert(folder, rogue_ca, "rogue", "pacs.test", server=True),
        )
