"""The golden samples in docs/samples/ are what the code makes today: same inputs, same bytes (UIDs included).

On a failure after an intended change of the SR or the companions, regenerate them with
``python -m screener.dicom.samples`` and commit docs/samples/.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from screener.dicom import samples
from screener.dicom.sr import summarize

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "docs" / "samples"
REGENERATE = "regenerate with `python -m screener.dicom.samples` and commit docs/samples/"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    samples.write_samples(out, renderings=False)
    return out


def test_the_golden_samples_are_checked_in():
    for name in ("sr.dcm", "sr-dsrdump.txt", "sr.html", "README.md"):
        assert (GOLDEN / name).is_file(), f"docs/samples/{name} is missing: {REGENERATE}"
    assert sorted(p.name for p in (GOLDEN / "study").glob("*.dcm")) == ["lateral.dcm", "oblique-L.dcm", "oblique-R.dcm"]
    assert len(list((GOLDEN / "companion").glob("sc-*.dcm"))) == 3
    assert len(list((GOLDEN / "companion").glob("gsps-*.dcm"))) == 3
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert total < 2_000_000, "docs/samples should stay small"


def test_regenerated_dicom_files_are_byte_identical(fresh):
    made = sorted(p.relative_to(fresh) for p in fresh.rglob("*.dcm"))
    golden = sorted(p.relative_to(GOLDEN) for p in GOLDEN.rglob("*.dcm"))
    assert made == golden, REGENERATE
    for rel in made:
        assert (fresh / rel).read_bytes() == (GOLDEN / rel).read_bytes(), f"{rel} differs: {REGENERATE}"


def test_two_runs_give_the_same_bytes(fresh, tmp_path):
    samples.write_samples(tmp_path, renderings=False)
    for p in fresh.rglob("*.dcm"):
        assert (tmp_path / p.relative_to(fresh)).read_bytes() == p.read_bytes(), p.name


def test_the_sample_sr_content():
    sr = pydicom.dcmread(GOLDEN / "sr.dcm")
    rows = summarize(sr)
    assert [(r["finding"], r["present"], r["laterality"]) for r in rows] == [
        ("Cervical spondylosis", True, None),
        ("Cervical foraminal stenosis", False, "L"),
        ("Cervical foraminal stenosis", True, "R"),
    ]
    assert sr.PreliminaryFlag == "PRELIMINARY" and sr.VerificationFlag == "UNVERIFIED"
    study = {pydicom.dcmread(p).StudyInstanceUID for p in (GOLDEN / "study").glob("*.dcm")}
    assert study == {sr.StudyInstanceUID}


@pytest.mark.skipif(shutil.which("dsrdump") is None, reason="dsrdump (DCMTK) is not installed")
def test_the_dsrdump_rendering_matches_the_sr():
    proc = subprocess.run(["dsrdump", str(GOLDEN / "sr.dcm")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (GOLDEN / "sr-dsrdump.txt").read_text(encoding="utf-8"), REGENERATE


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_the_companion_samples_pass_dciodvfy():
    for path in sorted((GOLDEN / "companion").glob("*.dcm")):
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(("Error", "Warning"))]
        assert lines == [], f"{path.name}:\n" + "\n".join(lines)
