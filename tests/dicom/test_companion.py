"""Companions for viewers without SR support: Secondary Capture (burned in) and GSPS, checked with dciodvfy,
the node's writer and the sender."""

from __future__ import annotations

import copy
import shutil
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from screener import config
from screener.dicom import samples
from screener.dicom.companion import (
    GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    build_companions,
    burn_in,
    companion_files,
    companion_to_bytes,
    finding_line,
)
from screener.dicom.sr import finding_tracking_uid, summarize
from screener.errors import ConfigError


@pytest.fixture(scope="module")
def study():
    images = samples.sample_images()
    findings = samples.sample_findings(images, samples.sample_engines())
    sr = samples.build_sample_sr(findings)
    gray = {str(ds.SOPInstanceUID): np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns) for ds in images}
    return SimpleNamespace(images=images, findings=findings, sr=sr, gray=gray)


def test_finding_line(study):
    lateral, left, right = study.findings
    assert finding_line(lateral) == "AI: cervical spondylosis likely, 87% - NOT FOR DIAGNOSIS"
    assert finding_line(left) == "AI: foraminal stenosis L unlikely, 12% - NOT FOR DIAGNOSIS"
    assert finding_line(right) == "AI: foraminal stenosis R likely, 87% - NOT FOR DIAGNOSIS"


def test_burn_in_draws_the_box_and_the_banner_and_leaves_the_input(study):
    right = study.findings[2]
    src = study.gray[str(right.source.SOPInstanceUID)]
    before = src.copy()
    out = burn_in(src, [right])
    np.testing.assert_array_equal(src, before)  # pure
    x0, y0, x1, y1 = (round(v) for v in right.roi)
    assert out[(y0 + y1) // 2, x0] == 255 and out[y0, (x0 + x1) // 2] == 255  # the box edges
    banner = out[:8, :]
    assert (banner == 0).mean() > 0.5 and banner.max() == 255  # black banner with white text
    assert np.array_equal(out[200:, :60], src[200:, :60])  # elsewhere untouched


def test_none_and_bad_kind(study):
    assert build_companions("none", study.findings, study.sr, software_version="0") == []
    with pytest.raises(ValueError, match="companion kind"):
        build_companions("overlay", study.findings, study.sr, software_version="0")
    with pytest.raises(ValueError, match="pixels"):
        build_companions("secondary-capture", study.findings, study.sr, software_version="0")


def _reread(ds):
    import io

    return pydicom.dcmread(io.BytesIO(companion_to_bytes(ds)))


def test_secondary_capture(study):
    comps = build_companions("secondary-capture", study.findings, study.sr, pixels=study.gray, software_version="0.1.0")
    assert len(comps) == 3  # one per screened image
    series = {str(c.dataset.SeriesInstanceUID) for c in comps}
    assert len(series) == 1 and series.isdisjoint(
        {str(i.SeriesInstanceUID) for i in study.images} | {study.sr.SeriesInstanceUID}
    )
    for c, f in zip(comps, study.findings):
        ds = _reread(c.dataset)
        assert ds.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
        assert ds.StudyInstanceUID == study.sr.StudyInstanceUID and ds.PatientID == f.source.PatientID
        assert ds.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSIS" in ds.SeriesDescription
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == f.source.SOPInstanceUID
        ref = ds.SourceInstanceSequence[0]
        assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
            study.sr.SOPClassUID,
            study.sr.SOPInstanceUID,
        )
        assert ref.PurposeOfReferenceCodeSequence[0].CodeMeaning == "Source report"
        assert finding_line(f) in ds.ImageComments
        assert (ds.Rows, ds.Columns) == (f.source.Rows, f.source.Columns)
    again = build_companions("secondary-capture", study.findings, study.sr, pixels=study.gray, software_version="0.1.0")
    assert [companion_to_bytes(a.dataset) for a in again] == [companion_to_bytes(c.dataset) for c in comps]


def test_gsps_draws_the_box_and_carries_the_sr_tracking_uids(study):
    comps = build_companions("gsps", study.findings, study.sr, software_version="0.1.0")
    assert len(comps) == 3
    sr_uids = {r["tracking_uid"] for r in summarize(study.sr)}
    for c, f in zip(comps, study.findings):
        ds = _reread(c.dataset)
        assert ds.SOPClassUID == GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE
        assert ds.StudyInstanceUID == study.sr.StudyInstanceUID
        image = ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
        assert image.ReferencedSOPInstanceUID == f.source.SOPInstanceUID
        (annotation,) = ds.GraphicAnnotationSequence
        (text,) = annotation.TextObjectSequence
        assert text.UnformattedTextValue == finding_line(f)
        assert text.TrackingUID == finding_tracking_uid(f) and text.TrackingUID in sr_uids
        graphics = annotation.get("GraphicObjectSequence", [])
        if f.roi is None:
            assert not graphics
        else:
            (box,) = graphics
            assert box.GraphicType == "POLYLINE" and box.GraphicAnnotationUnits == "PIXEL"
            pts = np.asarray(box.GraphicData, dtype=float).reshape(-1, 2)
            assert pts.shape == (5, 2) and pts[0].tolist() == pts[-1].tolist()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("kind", ["secondary-capture", "gsps"])
def test_dciodvfy_is_clean(study, kind, tmp_path):
    (c, *_) = build_companions(kind, study.findings[2:], study.sr, pixels=study.gray, software_version="0.1.0")
    path = tmp_path / "companion.dcm"
    path.write_bytes(companion_to_bytes(c.dataset))
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("Error", "Warning"))]
    assert lines == [], "\n".join(lines)


def test_companion_files_never_raise(study, tmp_path):
    files = companion_files(
        "secondary-capture", study.findings, study.sr, {}, software_version="0.1.0"
    )  # no source files: logged, left out
    assert files == []
    src = tmp_path / "lateral.dcm"
    study.images[0].save_as(str(src), enforce_file_format=True)
    files = companion_files(
        "secondary-capture",
        study.findings[:1],
        study.sr,
        {str(study.images[0].SOPInstanceUID): src},
        software_version="0.1.0",
    )
    ((name, blob),) = files
    assert name.startswith("sc-2.25.") and pydicom.dcmread(__import__("io").BytesIO(blob)).BurnedInAnnotation == "YES"


def test_report_setting():
    assert config.parse({}).report.companion == "none"
    assert config.parse({"report": {"companion": "gsps"}}).report.companion == "gsps"
    with pytest.raises(ConfigError, match="report.companion"):
        config.parse({"report": {"companion": "png"}})


def test_node_writes_companions_next_to_the_sr(study, tmp_path):
    """The node's small hook: companion files next to the SR, returned for the outbox."""
    import dataclasses

    from screener.node import Node
    from screener.routing import Route
    from screener.screening import EngineResult, ImageOutcome

    src = tmp_path / "in" / "lateral.dcm"
    src.parent.mkdir()
    study.images[0].save_as(str(src), enforce_file_format=True)
    manifest = samples.fake_manifest("spondylosis", "2026.01.1", 0.4213)
    engines = {"spondylosis": SimpleNamespace(manifest=manifest)}
    base = config.Settings()
    settings = dataclasses.replace(
        base,
        node=dataclasses.replace(base.node, var_dir=str(tmp_path / "var"), port=0),
        report=config.ReportSettings(companion="secondary-capture"),
    )
    node = Node(settings, engines=engines)  # type: ignore[arg-type]
    try:
        f = study.findings[0]
        outcome = ImageOutcome(
            path=src,
            sop_instance_uid=str(f.source.SOPInstanceUID),
            study_uid=str(f.source.StudyInstanceUID),
            header=f.source,
            route=Route("lateral", ("spondylosis",), False, ""),
            results=[EngineResult("spondylosis", "2026.01.1", "onnx-fp32", 0.8731, True, 0.4213, None, 0.01)],
        )
        rel = node._write_companions([outcome], study.sr, Path("sr") / str(f.source.StudyInstanceUID))
        (one,) = rel
        written = pydicom.dcmread(node.var / one)
        assert written.SOPClassUID == SECONDARY_CAPTURE_IMAGE_STORAGE
        assert written.SourceInstanceSequence[0].ReferencedSOPInstanceUID == study.sr.SOPInstanceUID
        off = dataclasses.replace(settings, report=config.ReportSettings())
        node.settings = off
        assert node._write_companions([outcome], study.sr, Path("sr")) == []
    finally:
        node.store.close()


def test_sender_sends_a_companion_with_its_own_sop_class(study, tmp_path):
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]

    from screener.dicom.sender import TRANSFER_SYNTAXES, send_file

    received = []
    lock = threading.Lock()

    def on_store(event):
        with lock:
            received.append(str(event.dataset.SOPClassUID))
        return 0x0000

    ae = AE(ae_title="PACS")
    for sop in (
        Comprehensive3DSRStorage,
        SECONDARY_CAPTURE_IMAGE_STORAGE,
        GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
    ):
        ae.add_supported_context(sop, TRANSFER_SYNTAXES)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        port = server.server_address[1]
        for kind in ("secondary-capture", "gsps"):
            (c, *_) = build_companions(kind, study.findings, study.sr, pixels=study.gray, software_version="0.1.0")
            path = tmp_path / f"{kind}.dcm"
            path.write_bytes(companion_to_bytes(c.dataset))
            ok, error = send_file(path, config.Destination("PACS", "127.0.0.1", port), "CSPINE", timeout_s=10)
            assert ok, error
    finally:
        server.shutdown()
    assert received == [SECONDARY_CAPTURE_IMAGE_STORAGE, GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE]


def test_secondary_capture_keeps_any_patient_orientation(study):
    from dataclasses import replace

    a = study.findings[0]
    none = copy.deepcopy(a.source)
    del none.PatientOrientation
    compound = copy.deepcopy(a.source)
    compound.PatientOrientation = ["AL", "F"]
    for header, expected in ((none, []), (compound, ["AL", "F"])):
        (c,) = build_companions(
            "secondary-capture", [replace(a, source=header)], study.sr, pixels=study.gray, software_version="0"
        )
        assert list(c.dataset.PatientOrientation) == expected
