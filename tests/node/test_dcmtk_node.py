"""DCMTK, the reference DICOM toolkit, against a running node.

echoscu and storescu are the SCUs a site uses to check and feed the node (README, deploy/ADMIN.md);
the node's results go to a DCMTK storescp, so the SR is proven to be accepted by a real peer, then
checked with dsrdump (DCMTK's SR parser) and dciodvfy (dicom3tools' IOD checker, when installed).
Needs DCMTK (apt-get install dcmtk; .ci/run installs it): skips without it. Loopback only, on
OS-assigned free ports.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from screener import config
from screener.dicom.sr import summarize
from tests.support.dicom_factory import make_dx, make_study_ids
from tests.support.node_helpers import node_settings, synth_gray

TOOLS = ("echoscu", "storescu", "storescp", "dsrdump", "dcmcjpeg")
MISSING = [t for t in TOOLS if shutil.which(t) is None]
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"needs DCMTK ({', '.join(MISSING)} not found): apt-get install dcmtk (.ci/run installs it)",
    ),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


class StoreSCP:
    """`storescp -od DIR -aet TESTPACS PORT` in a subprocess: the test PACS the node sends SRs to."""

    def __init__(self, folder: Path, ae_title: str = "TESTPACS") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self.log = folder.parent / f"{folder.name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["storescp", "-od", str(self.folder), "-aet", self.ae_title, str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"storescp exited with {self.proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"storescp did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    @property
    def destination(self) -> config.Destination:
        return config.Destination(self.ae_title, "127.0.0.1", self.port)

    def received(self, study_uid: str) -> list[Path]:
        found = []
        for path in sorted(p for p in self.folder.iterdir() if p.is_file()):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.StudyInstanceUID == study_uid:
                found.append(path)
        return found


@pytest.fixture(scope="module")
def storescp(tmp_path_factory):
    scp = StoreSCP(tmp_path_factory.mktemp("storescp") / "received").start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def node(built, storescp, tmp_path_factory):
    from screener.node import Node

    settings = node_settings(
        tmp_path_factory.mktemp("dcmtk-node") / "var", built[1].parent, [storescp.destination], study_stable_s=1.0
    )
    n = Node(settings)
    n.start()
    yield n
    n.stop()


def wait_for_study(node, study_uid: str, states=("sent",), timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        row = node.store.get_study(study_uid)
        state = row.state if row else None
        if state in states or state in ("failed", "skipped"):
            return state
        time.sleep(0.2)
    raise AssertionError(f"study still {state!r} after {timeout} s; node: {node.store.counts()}")


def test_echoscu(node):
    ok = run("echoscu", "-aec", "CSPINE", "-aet", "MODALITY", "127.0.0.1", str(node.port))
    assert ok.returncode == 0, output(ok)
    wrong = run("echoscu", "-aec", "NOT-CSPINE", "-aet", "MODALITY", "127.0.0.1", str(node.port))
    assert wrong.returncode != 0, "a wrong called AE title must be rejected"
    assert "reject" in output(wrong).lower(), output(wrong)


def test_storescu_to_sr_at_storescp(node, storescp, built, tmp_path):
    ids = make_study_ids()
    study_uid = ids["StudyInstanceUID"]
    data = built[0].data
    plain = tmp_path / "lateral.dcm"
    make_dx(synth_gray(data, 0), ids, "LL", instance_number=1).save_as(plain, enforce_file_format=True)
    # The same kind of image as DCMTK encodes it for a PACS that stores JPEG Lossless.
    source = tmp_path / "lateral2.dcm"
    make_dx(synth_gray(data, 4), ids, "LL", instance_number=2).save_as(source, enforce_file_format=True)
    jpeg = tmp_path / "lateral2-jpegll.dcm"
    enc = run("dcmcjpeg", str(source), str(jpeg))
    assert enc.returncode == 0, output(enc)
    assert pydicom.dcmread(jpeg, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (plain, jpeg)]

    # -xs: also propose JPEG Lossless (storescu proposes only uncompressed syntaxes by default).
    sent = run(
        "storescu",
        "-v",
        "-xs",
        "-aec",
        "CSPINE",
        "-aet",
        "MODALITY",
        "127.0.0.1",
        str(node.port),
        str(plain),
        str(jpeg),
    )
    assert sent.returncode == 0, output(sent)
    assert output(sent).count("Received Store Response (Success)") == 2, output(sent)
    assert {node.store.get_instance(u).state for u in uids} <= {"received", "screened", "reported", "sent"}

    assert wait_for_study(node, study_uid) == "sent", node.store.failures()
    (sr_path,) = storescp.received(study_uid)
    sr = pydicom.dcmread(sr_path)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == study_uid
    assert {r["source_sop_instance_uid"] for r in summarize(sr)} == set(uids)

    dump = run("dsrdump", str(sr_path))
    assert dump.returncode == 0 and "Imaging Measurement Report" in dump.stdout, output(dump)
    if shutil.which("dciodvfy"):
        check = run("dciodvfy", str(sr_path))
        errors = [line for line in output(check).splitlines() if line.startswith("Error")]
        assert errors == [], output(check)

    # An SR sent to the node (a PACS rule forwarding everything) is refused at negotiation; the node
    # keeps serving.
    back = run("storescu", "-aec", "CSPINE", "-aet", "MODALITY", "127.0.0.1", str(node.port), str(sr_path))
    assert "presentation context" in output(back).lower(), output(back)
    assert node.store.get_instance(str(sr.SOPInstanceUID)) is None
    again = run("echoscu", "-aec", "CSPINE", "127.0.0.1", str(node.port))
    assert again.returncode == 0, output(again)
