"""A real PACS in the loop: Orthanc, configured with deploy/orthanc/, auto-forwards a study to the node
and receives the node's SR back into the same study.

Orthanc runs from the deploy files themselves: deploy/orthanc/orthanc.json is read, its comments
stripped, ports / storage paths / the "cspine" modality's port substituted (and DICOM access made
stricter than the shipped default), and deploy/orthanc/forward-to-screener.lua is the routing script.
Needs the `Orthanc` binary (Debian/Ubuntu: apt-get install orthanc; .ci/run installs it); skips
without it. Everything listens on OS-assigned free ports and is reached on 127.0.0.1 only (Orthanc
1.10 has no bind-address option: its ports listen on all interfaces, HTTP refuses non-loopback
clients because "RemoteAccessAllowed" is false).
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest

from screener import config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "orthanc"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _orthanc_binary() -> str | None:
    found = shutil.which("Orthanc")
    if found:
        return found
    for candidate in ("/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc", "/usr/local/bin/Orthanc"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


ORTHANC = _orthanc_binary()
needs_orthanc = pytest.mark.skipif(
    ORTHANC is None, reason="needs the Orthanc DICOM server: apt-get install orthanc (.ci/run installs it)"
)


# ----------------------------------------------------------------------------------------- helpers


def strip_json_comments(text: str) -> str:
    """Remove // and /* */ comments (Orthanc's JSON dialect), leaving string contents alone."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_string = False
            i += 1
        elif c == '"':
            in_string = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise ValueError("unterminated /* comment")
            out.append(" ")
            i = end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def load_deploy_config() -> dict:
    return json.loads(strip_json_comments((DEPLOY / "orthanc.json").read_text(encoding="utf-8")))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """An Orthanc process started from the deploy configuration, with a small REST client."""

    def __init__(
        self, workdir: Path, *, cspine_port: int, dicom_port: int | None = None, http_port: int | None = None
    ) -> None:
        self.workdir = workdir
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.cspine_port = cspine_port
        self.user, self.password = "cspine-test", secrets.token_hex(8)
        self.log_path = workdir / "orthanc.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        # Loopback REST calls must never go through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def configuration(self) -> dict:
        cfg = load_deploy_config()
        storage = self.workdir / "db"
        cfg.update(
            {
                "StorageDirectory": str(storage),
                "IndexDirectory": str(storage),
                "HttpPort": self.http_port,
                "DicomPort": self.dicom_port,
                "DicomAet": "ORTHANC",
                "Plugins": [],
                # The shipped script, found by the name the deploy config gives it.
                "LuaScripts": [str(DEPLOY / Path(p).name) for p in cfg["LuaScripts"]],
                # Stricter than shipped: only registered modalities may store, from their own host, to
                # our AE title. The "cspine" entry must be enough for the node's SR to be accepted.
                "DicomAlwaysAllowStore": False,
                "DicomCheckModalityHost": True,
                "DicomCheckCalledAet": True,
                "DicomScuTimeout": 10,
                "DicomAssociationCloseDelay": 1,
                "SaveJobs": False,
            }
        )
        cspine = cfg["DicomModalities"]["cspine"]
        if isinstance(cspine, list):
            cspine[1:3] = ["127.0.0.1", self.cspine_port]
        else:
            cspine.update({"Host": "127.0.0.1", "Port": self.cspine_port})
        return cfg

    def start(self, timeout: float = 30.0) -> Orthanc:
        conf_dir = self.workdir / "etc"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "orthanc.json").write_text(json.dumps(self.configuration(), indent=2))
        # The Debian layout: users live in credentials.json next to orthanc.json.
        (conf_dir / "credentials.json").write_text(json.dumps({"RegisteredUsers": {self.user: self.password}}))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [ORTHANC, str(conf_dir)],
            cwd=self.workdir,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"Orthanc exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system")
                return self
            except urllib.error.HTTPError as exc:  # it answers, but refuses us: no point in waiting
                self.stop()
                raise AssertionError(f"Orthanc refused GET /system: HTTP {exc.code}\n{self.log_tail()}") from None
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"Orthanc did not answer on port {self.http_port} within {timeout} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        raw: bool = False,
        timeout: float = 30.0,
    ):
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if content_type:
            req.add_header("Content-Type", content_type)
        with self._opener.open(req, timeout=timeout) as resp:
            data = resp.read()
        return data if raw else json.loads(data)

    def get(self, path: str, raw: bool = False):
        return self._request("GET", path, raw=raw)

    def post(self, path: str, body: bytes, content_type: str = "application/json"):
        return self._request("POST", path, body, content_type)

    def upload(self, ds) -> dict:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        return self.post("/instances", buf.getvalue(), "application/dicom")

    def store_jobs(self) -> list[dict]:
        return [j for j in self.get("/jobs?expand") if j.get("Type") == "DicomModalityStore"]


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


# ------------------------------------------------------------------------------------------- tests


def test_deploy_config_is_usable():
    """The shipped config parses once comments are stripped and names the shipped Lua script."""
    cfg = load_deploy_config()
    assert cfg["DicomAet"] and cfg["DicomPort"] and cfg["HttpPort"]
    scripts = [Path(p).name for p in cfg["LuaScripts"]]
    assert "forward-to-screener.lua" in scripts and all((DEPLOY / s).is_file() for s in scripts)
    cspine = cfg["DicomModalities"]["cspine"]
    aet, port = (cspine[0], cspine[2]) if isinstance(cspine, list) else (cspine["AET"], cspine["Port"])
    node = config.load(ROOT / "config.toml").node
    assert (aet, port) == (node.ae_title, node.port)
    # The node must be allowed to store its SR even where DicomAlwaysAllowStore is turned off.
    assert isinstance(cspine, list) or cspine.get("AllowStore", True) is True
    # Users belong in credentials.json (Debian merges /etc/orthanc/*.json; duplicates are fatal).
    assert "RegisteredUsers" not in cfg
    assert cfg["RemoteAccessAllowed"] is False or cfg.get("AuthenticationEnabled") is True


@pytest.mark.slow
@needs_orthanc
def test_orthanc_forwards_study_and_receives_sr(tmp_path, built):
    from screener.node import Node
    from tests.support.dicom_factory import make_dx, make_study_ids
    from tests.support.node_helpers import node_settings, synth_gray

    data = built[0].data
    ids = make_study_ids()
    lateral = make_dx(synth_gray(data, 0), ids, "LL", instance_number=1)
    oblique = make_dx(synth_gray(data, 1), ids, "LAO", instance_number=2, series_number=2, laterality="L")

    orthanc_dicom_port = free_port()
    destination = config.Destination("ORTHANC", "127.0.0.1", orthanc_dicom_port)
    node = Node(node_settings(tmp_path / "var", built[1].parent, [destination], study_stable_s=3.0))
    node.start()
    orthanc = Orthanc(tmp_path / "orthanc", cspine_port=node.port, dicom_port=orthanc_dicom_port)
    try:
        orthanc.start()
        assert "cspine-screener routing: loaded" in orthanc.log_tail(200), orthanc.log_tail()
        first = orthanc.upload(lateral)
        second = orthanc.upload(oblique)
        study_id = first["ParentStudy"]
        assert second["ParentStudy"] == study_id

        # Both images are forwarded (one store job each) and the SR comes back into the same study.
        deadline = time.monotonic() + 90
        sr_series = []
        while time.monotonic() < deadline:
            series = orthanc.get(f"/studies/{study_id}/series?expand")
            sr_series = [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]
            if sr_series:
                break
            time.sleep(0.5)
        assert sr_series, (
            f"no SR in the Orthanc study after 90 s; node: {node.store.counts()}; "
            f"jobs: {orthanc.store_jobs()}\n{orthanc.log_tail()}"
        )
        (sr_instance,) = orthanc.get(f"/series/{sr_series[0]['ID']}/instances")
        raw = orthanc.get(f"/instances/{sr_instance['ID']}/file", raw=True)

        # Forwarded exactly the two images; the SR that came back was not sent on to the node.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            jobs = orthanc.store_jobs()
            if len(jobs) >= 2 and all(j["State"] in ("Success", "Failure") for j in jobs):
                break
            time.sleep(0.3)
        time.sleep(1.0)  # a forwarded SR would show up as a third job at once
        jobs = orthanc.store_jobs()
        assert [j["State"] for j in jobs] == ["Success", "Success"], (jobs, orthanc.log_tail())
        assert all(j["Content"]["RemoteAet"] == "CSPINE" for j in jobs)
        assert node.store.get_instance(lateral.SOPInstanceUID).state in ("reported", "sent")
        assert node.store.get_instance(oblique.SOPInstanceUID).state == "skipped"
    finally:
        orthanc.stop()
        node.stop()

    sr = pydicom.dcmread(io.BytesIO(raw))
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == ids["StudyInstanceUID"]
    assert sr.SeriesInstanceUID not in (lateral.SeriesInstanceUID, oblique.SeriesInstanceUID)
    assert sr.SeriesDescription.startswith("AI screening: cervical spine")
    assert sr.PatientID == lateral.PatientID
    if shutil.which("dciodvfy"):
        path = tmp_path / "sr-from-orthanc.dcm"
        path.write_bytes(raw)
        assert dciodvfy_errors(path) == []


@needs_orthanc
def test_orthanc_stores_and_renders_the_companions(tmp_path):
    """Issue 14: the node's sender stores the SR and both kinds of companion in Orthanc, in the source
    study; Orthanc renders the Secondary Capture (GET /instances/{id}/preview). The PNG is kept as
    docs/samples/companion-orthanc-preview.png."""
    import cv2
    import numpy as np

    from screener.dicom import samples
    from screener.dicom.companion import (
        GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
        SECONDARY_CAPTURE_IMAGE_STORAGE,
        build_companions,
        companion_to_bytes,
    )
    from screener.dicom.image import dataset_to_gray8
    from screener.dicom.sender import send_file
    from screener.dicom.sr import sr_to_bytes

    images = samples.sample_images()
    findings = samples.sample_findings(images, samples.sample_engines())
    sr = samples.build_sample_sr(findings)
    gray = {str(ds.SOPInstanceUID): dataset_to_gray8(ds) for ds in images}
    right = findings[2]  # the oblique with a box and a positive call
    (sc,) = build_companions("secondary-capture", [right], sr, pixels=gray, software_version="0.1.0")
    (gsps,) = build_companions("gsps", [right], sr, software_version="0.1.0")
    files = {
        "sr": (sr_to_bytes(sr), str(sr.SOPInstanceUID)),
        "sc": (companion_to_bytes(sc.dataset), str(sc.dataset.SOPInstanceUID)),
        "gsps": (companion_to_bytes(gsps.dataset), str(gsps.dataset.SOPInstanceUID)),
    }

    # Nothing listens on the "cspine" port: Orthanc's forward of the uploaded image simply fails.
    orthanc = Orthanc(tmp_path / "orthanc", cspine_port=free_port())
    try:
        orthanc.start()
        study_id = orthanc.upload(images[2])["ParentStudy"]
        destination = config.Destination("ORTHANC", "127.0.0.1", orthanc.dicom_port)
        for name, (blob, _uid) in files.items():
            path = tmp_path / f"{name}.dcm"
            path.write_bytes(blob)
            ok, error = send_file(path, destination, "CSPINE", timeout_s=20)  # the node's own C-STORE
            assert ok, f"{name}: {error}\n{orthanc.log_tail()}"
        instances = orthanc.get(f"/studies/{study_id}/instances?expand")
        by_uid = {i["MainDicomTags"]["SOPInstanceUID"]: i for i in instances}
        for name, (_blob, uid) in files.items():
            assert uid in by_uid, f"{name} not in the source study in Orthanc"
        sc_id = by_uid[files["sc"][1]]["ID"]
        tags = orthanc.get(f"/instances/{sc_id}/simplified-tags")
        assert tags["SOPClassUID"] == SECONDARY_CAPTURE_IMAGE_STORAGE and tags["BurnedInAnnotation"] == "YES"
        gsps_tags = orthanc.get(f"/instances/{by_uid[files['gsps'][1]]['ID']}/simplified-tags")
        assert gsps_tags["SOPClassUID"] == GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE
        png = orthanc.get(f"/instances/{sc_id}/preview", raw=True)
    finally:
        orthanc.stop()

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    shown = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    burned = np.frombuffer(sc.dataset.PixelData, np.uint8).reshape(int(sc.dataset.Rows), int(sc.dataset.Columns))
    assert shown.shape == burned.shape
    assert float(np.abs(shown.astype(int) - burned.astype(int)).mean()) < 2.0  # Orthanc shows what was burned in
    (ROOT / "docs" / "samples" / "companion-orthanc-preview.png").write_bytes(png)


# ------------------------------------------------------------------------------------ DICOM TLS


def load_tls_config() -> dict:
    return json.loads(strip_json_comments((DEPLOY / "dicom-tls.json").read_text(encoding="utf-8")))


class OrthancTls(Orthanc):
    """Orthanc with deploy/orthanc/dicom-tls.json merged in (paths to the test's certificates) and the
    "cspine" modality reached over TLS."""

    def __init__(self, workdir: Path, *, cspine_port: int, pki, dicom_port: int | None = None) -> None:
        super().__init__(workdir, cspine_port=cspine_port, dicom_port=dicom_port)
        self.pki = pki

    def configuration(self) -> dict:
        cfg = super().configuration()
        tls = load_tls_config()
        tls.update(
            {
                "DicomTlsCertificate": str(self.pki.pacs.cert),
                "DicomTlsPrivateKey": str(self.pki.pacs.key),
                "DicomTlsTrustedCertificates": str(self.pki.ca.cert),
            }
        )
        cfg.update(tls)
        cspine = cfg["DicomModalities"]["cspine"]
        assert isinstance(cspine, dict), "the TLS flag needs the long form of the modality entry"
        cspine["UseDicomTls"] = True
        return cfg


def test_deploy_tls_config_is_usable():
    tls = load_tls_config()
    assert tls["DicomTlsEnabled"] is True and tls["DicomTlsRemoteCertificateRequired"] is True
    assert {"DicomTlsCertificate", "DicomTlsPrivateKey", "DicomTlsTrustedCertificates"} <= set(tls)
    assert not set(tls) & set(load_deploy_config()), "a key in two files is an Orthanc startup error"


@pytest.mark.slow
@needs_orthanc
def test_orthanc_dicom_tls_round_trip(tmp_path, built):
    """Orthanc forwards over DICOM TLS to the node's TLS listener; the node's SR goes back to Orthanc
    over TLS (mutual authentication both ways, certificates made by the test)."""
    import dataclasses

    from screener.node import Node
    from tests.support.dicom_factory import make_dx, make_study_ids
    from tests.support.node_helpers import node_settings, synth_gray
    from tests.support.tls_certs import OPENSSL, Pki

    if OPENSSL is None:
        pytest.skip("needs the openssl command line")
    pki = Pki.create(tmp_path / "pki")
    data = built[0].data
    ids = make_study_ids()
    lateral = make_dx(synth_gray(data, 0), ids, "LL", instance_number=1)

    orthanc_dicom_port = free_port()
    destination = config.Destination("ORTHANC", "127.0.0.1", orthanc_dicom_port, tls=True)
    base = node_settings(tmp_path / "var", built[1].parent, [destination], study_stable_s=2.0)
    tls = config.TlsSettings(
        certificate=str(pki.node.cert),
        private_key=str(pki.node.key),
        ca_file=str(pki.ca.cert),
        listen=True,
        port=free_port(),
        plain_listener=False,
    )
    node = Node(dataclasses.replace(base, tls=tls))
    node.start()
    orthanc = OrthancTls(
        tmp_path / "orthanc", cspine_port=node.listener.tls_port, pki=pki, dicom_port=orthanc_dicom_port
    )
    try:
        orthanc.start()
        study_id = orthanc.upload(lateral)["ParentStudy"]
        deadline = time.monotonic() + 90
        sr_series = []
        while time.monotonic() < deadline:
            series = orthanc.get(f"/studies/{study_id}/series?expand")
            sr_series = [s for s in series if s["MainDicomTags"].get("Modality") == "SR"]
            if sr_series:
                break
            time.sleep(0.5)
        assert sr_series, (
            f"no SR in the Orthanc study after 90 s; node: {node.store.counts()}; "
            f"jobs: {orthanc.store_jobs()}\n{orthanc.log_tail()}"
        )
        jobs = orthanc.store_jobs()
        assert jobs and jobs[0]["State"] == "Success", (jobs, orthanc.log_tail())
        row = node.store.get_instance(lateral.SOPInstanceUID)
        assert row is not None and row.calling_aet == "ORTHANC"

        # Orthanc refuses a node whose certificate it does not trust, and a plain connection.
        from screener.dicom.sender import send_file

        (sr_instance,) = orthanc.get(f"/series/{sr_series[0]['ID']}/instances")
        sr_path = tmp_path / "sr.dcm"
        sr_path.write_bytes(orthanc.get(f"/instances/{sr_instance['ID']}/file", raw=True))
        rogue = dataclasses.replace(tls, certificate=str(pki.rogue.cert), private_key=str(pki.rogue.key))
        ok, _ = send_file(sr_path, destination, "CSPINE", timeout_s=10, tls=rogue)
        assert not ok
        ok, _ = send_file(sr_path, dataclasses.replace(destination, tls=False), "CSPINE", timeout_s=10)
        assert not ok
        ok, error = send_file(sr_path, destination, "CSPINE", timeout_s=10, tls=tls)
        assert ok, error
    finally:
        orthanc.stop()
        node.stop()
