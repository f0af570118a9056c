"""Loopback integration: PACS (pynetdicom SCU) -> node -> SR at a test SCP."""

import shutil
import subprocess
import threading
import time

import pydicom
import pytest

from screener.dicom.sr import summarize
from screener.node import Node
from tests.support.dicom_factory import make_dx, make_study_ids
from tests.support.node_helpers import CollectingSCP, node_settings, send_images, synth_gray

pytestmark = pytest.mark.slow


@pytest.fixture
def engines_dir(built):
    return built[1].parent


@pytest.fixture
def study(built):
    data = built[0].data
    ids = make_study_ids()
    lateral = make_dx(synth_gray(data, 0), ids, "LL", instance_number=1)
    lao = make_dx(synth_gray(data, 1), ids, "LAO", instance_number=2, series_number=2, laterality="L")
    rao = make_dx(synth_gray(data, 2), ids, "RAO", instance_number=3, series_number=3, laterality="R")
    return ids, [lateral, lao, rao]


def dciodvfy_errors(path):
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_study_to_sr(tmp_path, all_engines, study):
    """A lateral and two obliques -> one SR with spondylosis on the lateral, ROI + stenosis on the obliques."""
    ids, images = study
    scp = CollectingSCP().start()
    node = Node(
        node_settings(
            tmp_path / "var", all_engines["dir"], [scp.destination], enabled=("spondylosis", "roi", "stenosis")
        )
    )
    node.start()
    try:
        assert send_images(images, node.port) == [0, 0, 0]
        (sr,) = scp.wait_for(1)
    finally:
        node.stop()
        scp.stop()
    assert sr.StudyInstanceUID == ids["StudyInstanceUID"]
    assert sr.SeriesInstanceUID not in {im.SeriesInstanceUID for im in images}
    assert "NOT FOR DIAGNOSIS" in sr.SeriesDescription.upper()
    rows = {r["source_sop_instance_uid"]: r for r in summarize(sr)}
    assert set(rows) == {im.SOPInstanceUID for im in images}
    lateral, lao, rao = (rows[im.SOPInstanceUID] for im in images)
    assert "spondylosis" in lateral["finding"].lower() and lateral["roi"] is None
    for row, side in ((lao, "L"), (rao, "R")):
        assert "stenosis" in row["finding"].lower()
        assert row["roi"] is not None and row["laterality"] == side
    for row in rows.values():
        assert row["present"] == (
            row["probability"] >= float(next(p for p in row["parameters"] if p.startswith("threshold=")).split("=")[1])
        )
    if shutil.which("dciodvfy"):
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []


def test_restart_after_ack_still_sends(tmp_path, engines_dir, study):
    _, images = study
    scp = CollectingSCP().start()
    settings = node_settings(tmp_path / "var", engines_dir, [scp.destination], study_stable_s=3600)
    node = Node(settings)
    node.start()
    assert send_images(images[:1], node.port) == [0]
    node.stop()  # stopped after acknowledging, before the study was complete
    assert scp.received == []
    settings = node_settings(tmp_path / "var", engines_dir, [scp.destination], study_stable_s=0.5)
    node = Node(settings)
    node.start()
    try:
        scp.wait_for(1)
    finally:
        node.stop()
        scp.stop()


def test_destination_down_then_up(tmp_path, engines_dir, study):
    _, images = study
    scp = CollectingSCP().start()
    port = scp.port
    scp.stop()  # the PACS is down
    node = Node(node_settings(tmp_path / "var", engines_dir, [scp.destination]))
    node.start()
    try:
        assert send_images(images[:1], node.port) == [0]
        deadline = time.time() + 60
        while time.time() < deadline:
            rows = node.store.due_outbox(time.time() + 3600)
            if rows and rows[0].attempts >= 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("no failed send attempt recorded")
        scp2 = CollectingSCP(port=port).start()
        try:
            scp2.wait_for(1)
        finally:
            scp2.stop()
    finally:
        node.stop()


def test_monochrome1_and_2_same_probability(tmp_path, built, engines_dir):
    from screener.node import load_engines
    from screener.screening import Screener

    settings = node_settings(tmp_path / "var", engines_dir, [])
    screener = Screener(load_engines(settings), settings.routing)
    ids = make_study_ids()
    g = synth_gray(built[0].data, 3)
    paths = []
    for phot in ("MONOCHROME2", "MONOCHROME1"):
        p = tmp_path / f"{phot}.dcm"
        make_dx(g, ids, "LL", photometric=phot).save_as(p, enforce_file_format=True)
        paths.append(p)
    a, b = screener.screen(paths)
    assert a.results and b.results
    assert a.results[0].probability == b.results[0].probability


def test_bad_inputs_keep_node_serving(tmp_path, engines_dir, study):
    ids, images = study
    node = Node(node_settings(tmp_path / "var", engines_dir, []))
    node.start()
    try:
        bad = images[0].copy()
        bad.SOPInstanceUID = pydicom.uid.generate_uid()
        bad.file_meta.MediaStorageSOPInstanceUID = bad.SOPInstanceUID
        bad.PixelData = b"\x00" * 10  # corrupt pixel data: accepted on the wire, failed with a reason
        assert send_images([bad], node.port) == [0]
        node.store.force_complete(ids["StudyInstanceUID"])
        deadline = time.time() + 60
        while time.time() < deadline:
            inst = node.store.get_instance(bad.SOPInstanceUID)
            if inst.state == "failed":
                break
            time.sleep(0.2)
        assert inst.state == "failed" and "pixel" in inst.reason.lower()
        # the node still serves
        assert send_images(images[:1], node.port) == [0]
    finally:
        node.stop()


class SlowSCP(CollectingSCP):
    """A destination that takes its time to answer each C-STORE (the SR stays on the wire)."""

    def __init__(self, delay_s: float = 2.0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.storing = threading.Event()

    def _on_store(self, event):
        self.storing.set()
        time.sleep(self.delay_s)
        return super()._on_store(event)


def test_late_image_while_sr_on_the_wire_is_reported(tmp_path, built, engines_dir, study):
    """Issue 9 item 1, deterministic with a slow destination: the late image's study is reopened, the
    SR on the wire finishes without touching it, a second SR (predecessor, instance number 2) follows."""
    ids, (lateral, *_) = study
    images = [lateral, make_dx(synth_gray(built[0].data, 3), ids, "LL", instance_number=4, series_number=4)]
    scp = SlowSCP().start()
    node = Node(node_settings(tmp_path / "var", engines_dir, [scp.destination]))
    node.start()
    try:
        assert send_images(images[:1], node.port) == [0]
        assert scp.storing.wait(60), "no SR sent"
        assert send_images(images[1:2], node.port) == [0]  # while the first SR is on the wire
        first, second = scp.wait_for(2, 90)
        deadline = time.time() + 30
        while node.store.get_study(ids["StudyInstanceUID"]).state != "sent" and time.time() < deadline:
            time.sleep(0.1)
        study_row = node.store.get_study(ids["StudyInstanceUID"])
        assert study_row.state == "sent" and node.store.check_invariants() == []
        assert {node.store.get_instance(im.SOPInstanceUID).state for im in images[:2]} == {"sent"}
    finally:
        node.stop()
        scp.stop()
    assert {r["source_sop_instance_uid"] for r in summarize(second)} == {im.SOPInstanceUID for im in images[:2]}
    assert int(second.InstanceNumber) == 2 and str(second.SOPInstanceUID) == study_row.sr_sop_instance_uid
    pred = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == first.SOPInstanceUID
