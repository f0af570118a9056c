"""The fast SR (screener.dicom.sr_fast + sr_write) against its reference (highdicom + pydicom's writer):
the same bytes, or the same error, for every input."""

from __future__ import annotations

import copy
import dataclasses
import io
import random
from datetime import datetime

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from screener.dicom import sr as S
from screener.dicom.sr import EngineInfo, Finding, SRReference, build_sr, build_sr_reference, sr_to_bytes
from screener.dicom.sr_write import part10_bytes
from tests.dicom.test_sr import DEVICE_UID, SPONDYLOSIS, STENOSIS, STUDY, WHEN, make_source

XA = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image: multi-frame IOD
CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
KW = dict(software_version="0.1.0", device_uid=DEVICE_UID, content_datetime=WHEN)


def outcome(fn, findings, **kw):
    """The SR's bytes, or (error type, message)."""
    try:
        return fn(findings, **kw)
    except Exception as exc:  # noqa: BLE001 - compared below
        return (type(exc), str(exc))


def fast_bytes(findings, **kw) -> bytes:
    return sr_to_bytes(build_sr(findings, **kw))


def reference_bytes(findings, **kw) -> bytes:
    return S.sr_to_bytes_reference(build_sr_reference(findings, **kw))


def assert_identical(findings, fast_only: bool = True, **kw) -> bytes | tuple:
    """Same bytes (or same error) from both builders and writers; `fast_only`: and the fast path
    built and wrote it (no fall-back to the reference)."""
    args = {**KW, **kw}
    expected = outcome(reference_bytes, findings, **args)
    got = outcome(fast_bytes, findings, **args)
    assert got == expected
    if fast_only and isinstance(expected, bytes):
        sr = build_sr(findings, **args)
        assert not isinstance(sr, hd.sr.Comprehensive3DSR), "built by the reference"
        assert part10_bytes(sr) is not None, "written by pydicom"
    return expected


@pytest.fixture
def study_findings() -> list[Finding]:
    return [
        Finding(make_source(1, "LL"), SPONDYLOSIS, probability=0.8731, present=True),
        Finding(
            make_source(2, "LAO", "L"), STENOSIS, 0.1234, False, roi=(410.5, 620.0, 1022.0, 1480.25), laterality="L"
        ),
        Finding(make_source(3, "RAO", "R"), STENOSIS, 0.5, True, roi=(300.0, 500.0, 900.0, 1300.0), laterality="R"),
    ]


def _engines(findings, **changes):
    return [dataclasses.replace(f, engine=dataclasses.replace(f.engine, **changes)) for f in findings]


# --------------------------------------------------------------------------- the SR tests' finding sets


def test_study_findings(study_findings):
    assert_identical(study_findings)
    assert_identical(study_findings[:1])
    assert_identical(study_findings[1:])


@pytest.mark.parametrize("validated,demo", [(True, False), (False, False), (True, True), (False, True)])
def test_validated_unvalidated_demo(study_findings, validated, demo):
    assert_identical(_engines(study_findings, validated=validated, demo=demo))
    assert_identical(_engines(study_findings[:1], validated=validated, demo=demo) + study_findings[1:])


def test_arguments(study_findings):
    assert_identical(study_findings, sr_uid="1.2.3.4", series_uid="1.2.3.5", series_number=12, instance_number=3)
    assert_identical(study_findings, manufacturer="Acme AI", device_name="node-7", model_name="cspine x")
    assert_identical(study_findings, content_datetime=datetime(2026, 1, 2, 3, 4, 5, 678901))
    assert_identical(study_findings, device_name=None, model_name=None)
    assert_identical(study_findings, manufacturer=None)
    assert_identical(study_findings, software_version="x" * 65)


def test_predecessors(study_findings):
    prior = build_sr(study_findings, **KW)
    ref = SRReference(STUDY, prior.SeriesInstanceUID, prior.SOPClassUID, prior.SOPInstanceUID)
    other = SRReference("1.2.3", "1.2.3.1", prior.SOPClassUID, "1.2.3.1.1")
    late = Finding(make_source(4, "LL"), SPONDYLOSIS, probability=0.1, present=False)
    assert_identical(study_findings + [late], predecessors=[ref], instance_number=2)
    assert_identical(study_findings, predecessors=[ref, other, ref], instance_number=4)


def test_one_image_two_engines_and_duplicate_findings():
    src = make_source(1, "LL")
    assert_identical([Finding(src, SPONDYLOSIS, 0.2, False), Finding(src, STENOSIS, 0.7, True)])
    # The same engine twice on the same image: the tracking UIDs get an occurrence number.
    same = [
        Finding(src, SPONDYLOSIS, 0.2, False),
        Finding(src, SPONDYLOSIS, 0.9, True),
        Finding(src, SPONDYLOSIS, 0.5, True),
    ]
    assert_identical(same)
    rows = S.summarize(build_sr(same, **KW))
    assert len({r["tracking_uid"] for r in rows}) == 3


def test_retrained_engine_and_manifest_digest(study_findings):
    retrained = [dataclasses.replace(study_findings[0], engine=dataclasses.replace(SPONDYLOSIS, version="2025.04.1"))]
    assert_identical(retrained + study_findings)
    assert_identical(_engines(study_findings, manifest_sha256="ab" * 32, backend="tensorrt-fp16"))


def test_other_finding_codes_and_numpy_inputs(study_findings):
    import numpy as np
    from pydicom.sr.coding import Code

    for code in (
        Code("CSP0000000000000009", "99CSPINE", "Long code value"),  # > 16 characters: Long Code Value
        Code("urn:oid:1.2.3.4.5.6.7.8.9", "99CSPINE", "URN code value"),
        Code("CSP009", "99CSPINE", "Versioned", scheme_version="2"),
        Code("CSP010", "99CSPINE", "m" * 65),  # refused (Code Meaning is a Long String)
    ):
        assert_identical(_engines(study_findings, finding_code=code))
    src = study_findings[1].source
    engine = dataclasses.replace(STENOSIS, threshold=np.float32(0.25))
    roi = tuple(np.array([10, 20, 300, 400], dtype=np.int64))
    assert_identical([Finding(src, engine, np.float32(0.7), np.bool_(True), roi=roi, laterality="L")])


def test_multiframe_sources():
    xa = make_source(7, "LL")
    xa.SOPClassUID = XA
    xa.Modality = "XA"
    xa.NumberOfFrames = 3
    dx = make_source(8, "LAO", "L")
    dx.NumberOfFrames = 2
    single_xa = make_source(9, "LL")
    single_xa.SOPClassUID = XA
    assert_identical(
        [
            Finding(xa, STENOSIS, 0.9, True, roi=(10.0, 10.0, 50.0, 60.0), laterality="L"),
            Finding(dx, SPONDYLOSIS, 0.9, True),
            Finding(dx, STENOSIS, 0.1, False, roi=(10.0, 10.0, 50.0, 60.0), laterality="R"),
            Finding(single_xa, STENOSIS, 0.9, True, roi=(1.0, 2.0, 3.0, 4.0)),
        ]
    )
    # The first evidence dataset decides the header (here the XA's Patient and Study modules).
    assert_identical([Finding(single_xa, SPONDYLOSIS, 0.1, False), Finding(dx, SPONDYLOSIS, 0.1, False)])


def test_roi_clipped_and_refused():
    src = make_source(5, "LAO", "L", rows=100, cols=80)
    assert_identical([Finding(src, STENOSIS, 0.9, True, roi=(-10.0, 20.0, 95.0, 130.0), laterality="L")])
    empty = assert_identical([Finding(src, STENOSIS, 0.9, True, roi=(90.0, 20.0, 95.0, 30.0), laterality="L")])
    assert empty[0] is ValueError and "empty" in empty[1]


def test_refusals_are_the_same(study_findings):
    src = study_findings[0].source
    other = make_source(9, "LL", study="1.2.826.0.1.3680043.8.498.2002")
    cases = [
        [],
        [Finding(src, SPONDYLOSIS, 0.3, True)],
        [Finding(src, SPONDYLOSIS, 1.3, True)],
        [Finding(src, STENOSIS, 0.9, True, laterality="left")],
        [Finding(src, STENOSIS, 0.9, True, roi=(1.0, 2.0, float("nan"), 4.0))],
        study_findings + [Finding(other, SPONDYLOSIS, 0.1, False)],
        [
            Finding(src, SPONDYLOSIS, 0.1, False),
            Finding(make_source(2, "LL", patient_id="OTHER"), SPONDYLOSIS, 0.1, False),
        ],
    ]
    for findings in cases:
        result = assert_identical(findings)
        assert isinstance(result, tuple) and result[0] is ValueError
    for kw in (dict(series_number=0), dict(instance_number=0), dict(manufacturer="M" * 65), dict(model_name="x" * 70)):
        assert isinstance(assert_identical(study_findings, **kw), tuple)


# --------------------------------------------------------------------------- headers


def _finding(src: Dataset) -> list[Finding]:
    return [
        Finding(src, SPONDYLOSIS, 0.7, True),
        Finding(src, STENOSIS, 0.2, False, roi=(1.0, 2.0, 30.0, 40.0), laterality="R"),
    ]


def test_malformed_dates_and_sex_are_blanked_the_same():
    from screener.dicom import samples

    images = samples.sample_images()
    findings = samples.sample_findings(images, samples.sample_engines())
    assert_identical(findings)
    src = copy.deepcopy(images[0])
    with pytest.warns(UserWarning):
        src.PatientBirthDate = "19230405X"
    src.PatientSex = "Q"
    with pytest.warns(UserWarning):
        src.StudyTime = "25xx"
    first = [dataclasses.replace(f, source=src) for f in findings if f.source.SOPInstanceUID == src.SOPInstanceUID]
    assert_identical(first)


@pytest.mark.parametrize(
    "charset,name",
    [
        ("ISO_IR 100", "Müller^Jörg"),
        ("ISO_IR 192", "山田^太郎"),
        ("ISO_IR 192", "Ñandú^Zoë=Нандý^Зое"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"),
        ("ISO_IR 144", "Иванов^Иван"),
        (None, "Plain^Ascii"),
        ("", "Plain^Ascii"),
    ],
)
def test_character_sets(charset, name):
    src = make_source(1, "LL")
    if charset is None:
        del src.SpecificCharacterSet
    else:
        src.SpecificCharacterSet = charset
    src.PatientName = name
    src.StudyDescription = name.replace("^", " ").split("=")[0]  # non-ASCII text in a LO copied from the study
    src.ReferringPhysicianName = name
    assert_identical(_finding(src))


@pytest.mark.parametrize(
    "missing",
    ["AccessionNumber", "ReferringPhysicianName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
     "PatientName", "Manufacturer", "ManufacturerModelName", "SeriesNumber", "InstanceNumber", "StudyDescription",
     "Rows"],
)  # fmt: skip
def test_missing_attributes(missing):
    src = make_source(1, "LL")
    del src[missing]
    assert_identical(_finding(src))  # the reference refuses some (AttributeError): so does build_sr


@pytest.mark.parametrize(
    "keyword", ["AccessionNumber", "ReferringPhysicianName", "PatientBirthDate", "PatientSex", "StudyID", "PatientName"]
)
def test_empty_attributes(keyword):
    src = make_source(1, "LL")
    setattr(src, keyword, "")
    assert_identical(_finding(src))
    setattr(src, keyword, None)
    assert_identical(_finding(src))


def _rich_header(src: Dataset) -> Dataset:
    """Optional Patient / Study module attributes of many VRs, and acquisition equipment details."""
    src.PatientAge = "069Y"
    src.PatientSize = "1.72"
    src.PatientWeight = 71.5
    src.PatientBirthTime = "0815"
    src.IssuerOfPatientID = "HOSP"
    src.OtherPatientIDsSequence = [Dataset()]
    src.OtherPatientIDsSequence[0].PatientID = "ALT-1"
    src.OtherPatientIDsSequence[0].IssuerOfPatientID = "OTHER"
    src.OtherPatientIDsSequence[0].TypeOfPatientID = "TEXT"
    src.PatientComments = "line one\r\nline two"
    src.EthnicGroup = "X"
    src.PhysiciansOfRecord = ["Doc^One", "Doc^Two"]
    src.AdmittingDiagnosesDescription = ["pain", "trauma\\fall"]
    src.ProcedureCodeSequence = [Dataset()]
    src.ProcedureCodeSequence[0].CodeValue = "XRCSP"
    src.ProcedureCodeSequence[0].CodingSchemeDesignator = "L"
    src.ProcedureCodeSequence[0].CodeMeaning = "XR C-spine 3 views"
    src.ClinicalTrialSponsorName = "Sponsor"
    src.ClinicalTrialTimePointID = "T1"
    src.PatientIdentityRemoved = "NO"
    src.AcquisitionDateTime = "20250314081700.123456"
    src.InstitutionName = "Hospital"
    src.StationName = "DR1"
    src.DeviceSerialNumber = "SN-1"
    src.SoftwareVersions = ["1.0", "2.0"]
    return src


def test_rich_headers_and_acquisition_equipment():
    assert_identical(_finding(_rich_header(make_source(1, "LL"))))
    src = make_source(1, "LL")
    src.AcquisitionDate, src.AcquisitionTime = "20250314", "081700"
    assert_identical(_finding(src))
    del src.Manufacturer  # no acquisition equipment item
    assert_identical(_finding(src))


@pytest.mark.parametrize("sop_class", [CR, DX_PROCESSING, SC, XA, "1.2.3.4.5"])
def test_other_sop_classes(sop_class):
    src = make_source(1, "LL")
    src.SOPClassUID = sop_class
    assert_identical(_finding(src), fast_only=sop_class != "1.2.3.4.5")


def test_headers_read_from_files(study_findings):
    """As the node and replay do: headers read back from Part 10 files (deferred raw elements)."""
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        read = []
        for f in study_findings:
            src = _rich_header(copy.deepcopy(f.source))
            src.file_meta.TransferSyntaxUID = syntax
            buf = io.BytesIO()
            src.save_as(buf, enforce_file_format=True)
            header = pydicom.dcmread(io.BytesIO(buf.getvalue()), stop_before_pixels=True)
            read.append(dataclasses.replace(f, source=header))
        assert_identical(read)


def test_highdicom_reads_the_fast_sr(study_findings):
    data = fast_bytes(study_findings, **KW)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(data)))
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    whole = report.get_image_measurement_groups()
    regions = report.get_planar_roi_measurement_groups()
    assert (len(whole), len(regions)) == (1, 2)
    assert [str(g.tracking_uid) for g in whole + regions] == [r["tracking_uid"] for r in S.summarize(sr)]


# --------------------------------------------------------------------------- randomized


def _random_source(rng: random.Random, n: int, study: str, patient: dict) -> Dataset:
    src = make_source(n, rng.choice(["LL", "LAO", "RAO"]), study=study, rows=rng.choice([512, 2048]), cols=1664)
    for kw, value in patient.items():
        if value is None:
            if kw in src:
                del src[kw]
        else:
            setattr(src, kw, value)
    src.SOPClassUID = rng.choice([src.SOPClassUID] * 4 + [CR, DX_PROCESSING, XA])
    if rng.random() < 0.2:
        src.NumberOfFrames = rng.choice([1, 2])
    if rng.random() < 0.2:
        del src.SeriesNumber
    if rng.random() < 0.3:
        _rich_header(src)
    return src


def _random_engine(rng: random.Random) -> EngineInfo:
    task = rng.choice(["spondylosis", "stenosis"])
    return EngineInfo(
        task=task,
        name=rng.choice([f"cspine-{task}", "engine\\x", f"{task} ünïcode", "e" * 70]),
        version=rng.choice(["2025.03.1", "1", "v" * 20]),
        threshold=rng.choice([0.5, 0.4213, 0.0, 1.0, round(rng.random(), 6)]),
        validated=rng.random() < 0.5,
        demo=rng.random() < 0.3,
        backend=rng.choice(["onnx-int8", "onnx-fp32", "tensorrt-fp16"]),
        finding_code=S.FINDING_CODES[task],
        manifest_sha256=rng.choice(["", "ab" * 32]),
    )


def _random_case(rng: random.Random) -> tuple[list[Finding], dict]:
    study = f"1.2.826.0.1.3680043.8.498.{rng.randrange(1, 10**6)}"
    patient = {
        "SpecificCharacterSet": rng.choice(
            ["ISO_IR 100", "ISO_IR 192", None, "ISO_IR 100", "ISO_IR 192", "ISO_IR 144"]
        ),
        "PatientName": rng.choice(["Testperson^Erika", "Müller^Jörg", "", "A^B^C^D^E"]),
        "PatientBirthDate": rng.choice(["19560412", "", "19560412"]),
        "PatientSex": rng.choice(["F", "M", "O", ""]),
        "AccessionNumber": rng.choice(["ACC-1", ""] * 5 + [None]),  # None: the reference refuses
        "ReferringPhysicianName": rng.choice(["Doctor^Who", "", None]),
        "StudyDescription": rng.choice(["XR CERVICAL SPINE", "Halswirbelsäule", None]),
    }
    if patient["SpecificCharacterSet"] == "ISO_IR 144":
        patient["PatientName"] = rng.choice(["Иванов^Иван", "Ivanov^Ivan"])
    elif patient["SpecificCharacterSet"] != "ISO_IR 192" and rng.random() < 0.5:
        patient["PatientName"] = "Testperson^Erika"
    sources = [_random_source(rng, i + 1, study, patient) for i in range(rng.randint(1, 4))]
    engines = [_random_engine(rng) for _ in range(rng.randint(1, 3))]
    findings = []
    for _ in range(rng.randint(1, 8)):
        src, engine = rng.choice(sources), rng.choice(engines)
        p = rng.choice([round(rng.random(), rng.choice([2, 4, 8])), engine.threshold, 0.0, 1.0, 0.123456789])
        roi = lat = None
        if rng.random() < 0.6:
            x0, y0 = rng.uniform(-50, 1500), rng.uniform(-50, 400 if rng.random() < 0.9 else 1800)
            roi = (x0, y0, x0 + rng.uniform(1, 600), y0 + rng.uniform(1, 600))
            lat = rng.choice([None, "L", "R"])
        findings.append(Finding(src, engine, p, p >= engine.threshold, roi=roi, laterality=lat))
    day = datetime(2026, rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23), rng.randint(0, 59))
    kw: dict = {"content_datetime": day.replace(second=rng.randint(0, 59), microsecond=rng.choice([0, 1, 500000]))}
    if rng.random() < 0.3:
        sr_class = "1.2.840.10008.5.1.4.1.1.88.34"
        kw["predecessors"] = [SRReference(study, "1.2.3.9", sr_class, f"1.2.3.9.{i}") for i in range(rng.randint(1, 3))]
        kw["instance_number"] = len(kw["predecessors"]) + 1
    if rng.random() < 0.2:
        kw["manufacturer"] = rng.choice(["Acme", "Äcme AI", ""])
    return findings, kw


@pytest.mark.parametrize("seed", [20251126])
def test_random_finding_sets(seed, n_cases: int = 50):
    rng = random.Random(seed)
    built = 0
    for _ in range(n_cases):
        findings, kw = _random_case(rng)
        result = assert_identical(findings, **kw)
        built += isinstance(result, bytes)
    assert built >= n_cases // 2  # most cases are SRs, not refusals


# --------------------------------------------------------------------------- the writer alone


def _write(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _writer_dataset() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientName = "山田^太郎"
    ds.PatientAge = "069Y"
    ds.StudyDescription = "Ünïcode"
    ds.SeriesDescription = "plain ascii"
    ds.PatientComments = "with\r\ncontrol characters"
    ds.AdmittingDiagnosesDescription = ["a", "b\\c", "ü"]
    ds.ImagePositionPatient = [1.5, -2.25, 1e-12]
    ds.SliceThickness = "2.500"
    ds.InstanceNumber = 7
    ds.ReferencedFrameNumber = [1, 2, 3]
    ds.Rows = 512
    ds.LargestImagePixelValue = 4095  # US or SS: pydicom corrects the VR before writing
    ds.FrameTime = 33.3
    ds.SimpleFrameList = [1, 2, 3]  # UL
    ds.ReferencePixelX0 = -3  # SL
    ds.FloatPixelPaddingValue = 1.5
    ds.SharedFunctionalGroupsSequence = [Dataset()]
    ds.StudyDate = pydicom.valuerep.DA("20250314")
    ds.AcquisitionDateTime = datetime(2025, 3, 14, 9, 26, 53, 1)
    ds.ContentTime = "092653.5"
    ds.FrameIncrementPointer = 0x00181063
    ds.EncapsulatedDocument = b"\x01\x02\x03"
    ds.TextValue = "x" * 70000
    ds.ContentSequence = [Dataset(), Dataset()]
    ds.ContentSequence[0].TextValue = "in an item"
    ds.ContentSequence[1].SpecificCharacterSet = "ISO_IR 100"
    ds.ContentSequence[1].TextValue = "Müller"
    ds.ContentSequence[1].ConceptNameCodeSequence = []
    return ds


def test_writer_matches_pydicom():
    ds = _writer_dataset()
    del ds.LargestImagePixelValue
    assert part10_bytes(ds) == _write(ds)
    ds.ContentSequence[0].is_undefined_length_sequence_item = True
    ds["ContentSequence"].is_undefined_length = True
    ds.OtherPatientIDsSequence = DicomSequence([])
    ds["OtherPatientIDsSequence"].is_undefined_length = True
    ds.LongCodeValue = "a" * 70
    assert part10_bytes(ds) == _write(ds)
    for charset in ("", ["", "ISO 2022 IR 87"], "ISO_IR 100"):
        ds.SpecificCharacterSet = charset
        ds.PatientName = "Yamada^Tarou" if charset != ["", "ISO 2022 IR 87"] else "Yamada^Tarou=山田^太郎"
        ds.StudyDescription = "plain"
        assert part10_bytes(ds) == _write(ds)


def test_writer_leaves_what_pydicom_changes_to_pydicom():
    ds = _writer_dataset()
    assert part10_bytes(ds) is None  # an ambiguous VR (US or SS)
    del ds.LargestImagePixelValue
    raw = pydicom.dcmread(io.BytesIO(_write(ds)))
    assert part10_bytes(raw) is None  # raw (not yet decoded) elements
    assert sr_to_bytes(raw) == S.sr_to_bytes_reference(pydicom.dcmread(io.BytesIO(_write(ds))))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert part10_bytes(ds) is None
