"""screener replay: determinism, resume, compare, labels report, bad files."""

import json

import pydicom
import pytest

from screener.cli import main
from screener.dicom.sr import summarize
from screener.replay import compare
from tests.support.dicom_factory import make_dx, make_study_ids
from tests.support.node_helpers import synth_gray

pytestmark = pytest.mark.slow


@pytest.fixture
def folder(tmp_path, built):
    data = built[0].data
    root = tmp_path / "archive"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    sa, sb = make_study_ids(), make_study_ids()
    for i in range(2):
        make_dx(synth_gray(data, i, 384), sa, "LL", instance_number=i + 1).save_as(
            root / "a" / f"img{i}.dcm", enforce_file_format=True
        )
    make_dx(synth_gray(data, 2, 384), sb, "LL").save_as(root / "b" / "img.dcm", enforce_file_format=True)
    make_dx(synth_gray(data, 3, 384), sb, "AP").save_as(root / "b" / "ap.dcm", enforce_file_format=True)
    (root / "notes.txt").write_text("not dicom")
    bad = make_dx(synth_gray(data, 4, 384), sb, "LL")
    bad.PixelData = b"\x01\x02"
    bad.save_as(root / "b" / "corrupt.dcm", enforce_file_format=True)
    ct = make_dx(synth_gray(data, 5, 64), sb, "LL")
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ct.file_meta.MediaStorageSOPClassUID = ct.SOPClassUID
    ct.save_as(root / "b" / "ct.dcm", enforce_file_format=True)
    return root


@pytest.fixture
def cfg(tmp_path, built):
    p = tmp_path / "replay.toml"
    # The repository's routing rules, less those naming engines this config does not enable (rejected at load).
    rules = open("config.toml").read().split("[[routing]]")[1:]
    routing = "".join("[[routing]]" + r for r in rules if "stenosis" not in r)
    p.write_text(
        f'[engines]\ndir = "{built[1].parent}"\nbackend = "onnx-fp32"\n[logging]\nlevel = "warning"\n' + routing
    )
    return p


def audit(out):
    return json.loads((out / "audit.json").read_text())


def test_replay_outputs_and_reasons(folder, cfg, tmp_path, capsys):
    out = tmp_path / "audit1"
    assert main(["replay", str(folder), "--out", str(out), "--config", str(cfg), "--quiet"]) == 0
    rows = {r["file"]: r for r in audit(out)}
    assert rows["a/img0.dcm"]["engine"] == "spondylosis" and 0 <= rows["a/img0.dcm"]["probability"] <= 1
    assert rows["notes.txt"]["status"] == "failed" and "DICOM" in rows["notes.txt"]["reason"]
    assert rows["b/ct.dcm"]["status"] == "skipped" and "SOP class" in rows["b/ct.dcm"]["reason"]
    assert rows["b/ap.dcm"]["status"] == "skipped" and "routing" in rows["b/ap.dcm"]["reason"]
    assert rows["b/corrupt.dcm"]["status"] == "failed" and "pixel" in rows["b/corrupt.dcm"]["reason"]
    assert (out / "audit.csv").read_text().startswith("file,study_uid")
    srs = sorted((out / "sr").glob("*.dcm"))
    assert len(srs) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engines"]["spondylosis"]["files"]["onnx-fp32"]
    assert summary["software_version"]


def test_deterministic_and_compare(folder, cfg, tmp_path):
    o1, o2 = tmp_path / "r1", tmp_path / "r2"
    assert main(["replay", str(folder), "--out", str(o1), "--config", str(cfg), "--quiet"]) == 0
    assert main(["replay", str(folder), "--out", str(o2), "--config", str(cfg), "--quiet", "--compare", str(o1)]) == 0
    p1 = {(r["file"], r.get("engine")): r.get("probability") for r in audit(o1)}
    p2 = {(r["file"], r.get("engine")): r.get("probability") for r in audit(o2)}
    assert p1 == p2
    for sr1 in (o1 / "sr").glob("*.dcm"):
        a, b = pydicom.dcmread(sr1), pydicom.dcmread(o2 / "sr" / sr1.name)
        assert a.SOPInstanceUID == b.SOPInstanceUID
        assert summarize(a) == summarize(b)
    diff = json.loads((o2 / "compare.json").read_text())
    assert diff["findings_flipped"] == [] and diff["max_probability_drift"] == 0.0
    rows = audit(o1)
    for r in rows:
        if r.get("engine"):
            r["finding"] = "absent" if r["finding"] == "present" else "present"
            r["probability"] = r["probability"] + 0.25
            break
    old = tmp_path / "old.json"
    old.write_text(json.dumps(rows))
    diff = compare(old, audit(o2))
    assert len(diff["findings_flipped"]) == 1 and diff["max_probability_drift"] == pytest.approx(0.25)


def test_resume_skips_done(folder, cfg, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["replay", str(folder), "--out", str(out), "--config", str(cfg), "--quiet"]) == 0
    lines = (out / "audit.jsonl").read_text().splitlines()
    (out / "audit.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # interrupted mid-line
    assert main(["replay", str(folder), "--out", str(out), "--config", str(cfg), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files_this_run"] == len({json.loads(line)["file"] for line in lines}) - 2
    assert len(audit(out)) == len(lines)


def test_labels_report(folder, cfg, tmp_path):
    out = tmp_path / "r"
    assert main(["replay", str(folder), "--out", str(out), "--config", str(cfg), "--quiet"]) == 0
    rows = [r for r in audit(out) if r.get("engine")]
    labels = tmp_path / "labels.csv"
    labels.write_text("file,spondylosis\n" + "".join(f"{r['file']},{i % 2}\n" for i, r in enumerate(rows)))
    assert (
        main(["replay", str(folder), "--out", str(out), "--config", str(cfg), "--quiet", "--labels", str(labels)]) == 0
    )
    md = (out / "labels" / "spondylosis" / "report.md").read_text()
    assert "baseline" in md.lower()


def test_not_a_folder(tmp_path, cfg, capsys):
    assert main(["replay", str(tmp_path / "nope"), "--config", str(cfg)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_study_whose_sr_cannot_be_built_is_listed(folder, cfg, tmp_path, built):
    """Two images of one study that disagree on the Patient ID: no SR for that study, the replay
    finishes and summary.json says which study and why (our words, no header value)."""
    data = built[0].data
    study = make_study_ids()
    for i, pid in enumerate(("PID-A-998877", "PID-B-998877")):
        ds = make_dx(synth_gray(data, i, 384), study, "LL", instance_number=i + 1)
        ds.PatientID = pid
        ds.save_as(folder / f"mixed{i}.dcm", enforce_file_format=True)
    out = tmp_path / "audit-mixed"
    assert main(["replay", str(folder), "--out", str(out), "--config", str(cfg), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    failed = {f["study_uid"]: f["reason"] for f in summary["failed_srs"]}
    uid = study["StudyInstanceUID"]
    assert list(failed) == [uid] and "SR not built" in failed[uid]
    assert "998877" not in (out / "summary.json").read_text()
