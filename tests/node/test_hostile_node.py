"""A running node (`screener serve` in a subprocess) receives images that used to abort the decoder
(python-gdcm SIGABRT on a JPEG-LS header with Rows one larger than its codestream, issue 10 item 1)
or allocate gigabytes (RLE declaring 65535 x 65535): it keeps serving, fails those images with a
reason, screens the good one, and keeps serving after a restart (recovery does not loop on them).

The header checks of screener.dicom.image stop these before any decoder runs; a decoder that dies
on an image whose header is consistent is contained by the worker pool of issue 11."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import time
from pathlib import Path

import pytest
from pydicom.uid import JPEGLSLossless, RLELossless

from bench.hostile_corpus import NodeProcess
from tests.support.dicom_factory import make_dx, make_study_ids
from tests.support.node_helpers import synth_gray

pytestmark = pytest.mark.skipif(shutil.which("echoscu") is None, reason="dcmtk echoscu not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _echo(port: int) -> bool:
    import subprocess

    r = subprocess.run(["echoscu", "-aec", "CSPINE", "127.0.0.1", str(port)], capture_output=True, timeout=30)
    return r.returncode == 0


def _states(var: Path) -> dict[str, tuple[str, str]]:
    con = sqlite3.connect(f"file:{var / 'screener.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = con.execute("SELECT sop_instance_uid, state, coalesce(reason, '') FROM instances").fetchall()
    except sqlite3.OperationalError:
        rows = [(u, s, "") for u, s in con.execute("SELECT sop_instance_uid, state FROM instances").fetchall()]
    finally:
        con.close()
    return {u: (s, r) for u, s, r in rows}


def test_decoder_crashing_images_fail_and_node_keeps_serving(built, tmp_path):
    pytest.importorskip("jpeg_ls", reason="pyjpegls (JPEG-LS encoder) not installed")
    from pynetdicom import AE

    study = make_study_ids()
    gray = synth_gray(built[0].data, 0, max_side=256)
    good = make_dx(gray, study, "LL", instance_number=1)
    crasher = make_dx(gray, study, "LL", instance_number=2, bits=8)
    crasher.BitsAllocated, crasher.BitsStored, crasher.HighBit = 8, 8, 7
    crasher.PixelData = gray.tobytes()
    crasher.compress(JPEGLSLossless)
    crasher.Rows = int(crasher.Rows) + 1  # header disagrees with the codestream: gdcm aborted here
    huge = make_dx(gray, study, "LL", instance_number=3)
    huge.compress(RLELossless)
    huge.Rows = huge.Columns = 65535  # a few KB declaring 8 GB

    node = NodeProcess(tmp_path, built[1].parent, _free_port())
    node.start()
    try:
        ae = AE(ae_title="MODALITY")
        for ds in (good, crasher, huge):
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CSPINE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (good, crasher, huge)]
        assoc.release()
        assert statuses == [0, 0, 0]  # stored as sent; the pixel checks run at screening

        uids = {
            str(good.SOPInstanceUID): "good",
            str(crasher.SOPInstanceUID): "crasher",
            str(huge.SOPInstanceUID): "huge",
        }
        deadline = time.monotonic() + 120
        states: dict = {}
        while time.monotonic() < deadline:
            assert node.alive(), f"node died (rc {node.proc.returncode}); see {tmp_path / 'node.log'}"
            states = {uids[u]: v for u, v in _states(tmp_path / "var").items() if u in uids}
            if states.get("crasher", ("",))[0] == "failed" and states.get("huge", ("",))[0] == "failed":
                if states.get("good", ("",))[0] not in ("received",):
                    break
            time.sleep(0.5)
        assert states["crasher"][0] == "failed" and states["huge"][0] == "failed", states
        assert states["good"][0] != "failed", states
        assert _echo(node.port)

        # restart: recovery must not crash on the same images
        node.stop()
        node.start()
        time.sleep(3.0)
        assert node.alive() and _echo(node.port)
        again = {uids[u]: v for u, v in _states(tmp_path / "var").items() if u in uids}
        assert again["crasher"][0] == "failed" and again["huge"][0] == "failed"
    finally:
        node.close()
