"""Realistic DX images for tests (pydicom), no real patient data."""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

DX_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")


def make_study_ids() -> dict[str, str]:
    return {"StudyInstanceUID": generate_uid(), "AccessionNumber": "ACC001", "StudyID": "S1"}


def make_dx(
    gray8: np.ndarray,
    study: dict[str, str],
    view_position: str = "LL",
    *,
    bits: int = 12,
    photometric: str = "MONOCHROME2",
    series_number: int = 1,
    instance_number: int = 1,
    laterality: str = "",
    series_description: str = "C-SPINE",
    sop_uid: str | None = None,
) -> Dataset:
    """A DX For Presentation image from an 8-bit gray array, stored at `bits` bits with a window."""
    maxv = (1 << bits) - 1
    values = np.rint(gray8.astype(np.float64) * (maxv / 255.0)).astype(np.uint16)
    center, width = maxv / 2.0, float(maxv + 1)
    if photometric == "MONOCHROME1":
        values = (maxv - values).astype(np.uint16)
        center = maxv - center
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION
    ds.SOPClassUID = DX_PRESENTATION
    ds.SOPInstanceUID = UID(sop_uid) if sop_uid else generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    today = dt.date(2026, 11, 1).strftime("%Y%m%d")
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID-TEST-1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study["StudyInstanceUID"]
    ds.StudyDate = today
    ds.StudyTime = "101010"
    ds.AccessionNumber = study.get("AccessionNumber", "")
    ds.StudyID = study.get("StudyID", "")
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CERVICAL SPINE"
    ds.Modality = "DX"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "CSPINE"
    ds.ViewPosition = view_position
    if laterality:
        ds.ImageLaterality = laterality
        ds.Laterality = laterality
    ds.Manufacturer = "TestVendor"
    ds.InstanceNumber = instance_number
    ds.ContentDate = today
    ds.ContentTime = "101010"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientOrientation = ["A", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = values.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.VOILUTFunction = "LINEAR_EXACT"
    ds.PixelSpacing = [0.15, 0.15]
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.DetectorType = "SCINTILLATOR"
    ds.PixelData = values.tobytes()
    return ds


def save(ds: Dataset, path) -> None:
    ds.save_as(str(path), enforce_file_format=True)
