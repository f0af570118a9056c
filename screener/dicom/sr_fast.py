"""The study SR's pydicom tree, built directly: the same tree as `sr.build_sr_reference` (highdicom).

`screener.dicom.sr.build_sr` calls `measurement_group`, `report_content` and `header`; highdicom's
`Comprehensive3DSR` (in `build_sr_reference`) deep-copies the whole
content tree, re-parses it into its content item classes and walks it again for the evidence, which
cost ~16 ms of CPU per finding. This module creates the same data elements (same tags, VRs and values,
through the same pydicom value conversions) once: each dataset and `DataElement` is made directly with
its tag and VR. The header repeats, in the same order, what highdicom's `SOPClass` / `_SR` constructors
do with the first evidence dataset: the root attributes of its IOD's Patient and Study modules are copied
(the same element objects, as highdicom's `_copy_attribute` does), the same value checks run (dates,
times, Patient's Sex, person name, long strings, character set), and the per-study items that are not
per finding (coding scheme identification, the acquisition and highdicom Contributing Equipment items)
are made by highdicom itself.

Anything this module raises means "not handled here": `build_sr` then builds the SR with the reference,
which either builds it or raises its own error. Identity of the two (bytes of `sr_to_bytes`) is tested
for every finding set of tests/dicom/test_sr.py and a seeded random sample (tests/dicom/test_sr_fast.py).
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pydicom import config as pydicom_config
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import UID, Comprehensive3DSRStorage, ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage
from pydicom.valuerep import DA, DS, DT, TM

if TYPE_CHECKING:
    from screener.dicom.sr import Finding

# pydicom's per-element value validation only warns (its default mode); the values highdicom checks are
# checked below with highdicom's own functions.
_IGNORE = pydicom_config.IGNORE


class NotHandled(Exception):
    """An input this module does not build (the reference does, or refuses it)."""


# Tags (PS3.6) of the elements this module creates.
_CODE_VALUE = BaseTag(0x00080100)
_CODING_SCHEME_DESIGNATOR = BaseTag(0x00080102)
_CODING_SCHEME_VERSION = BaseTag(0x00080103)
_CODE_MEANING = BaseTag(0x00080104)
_MAPPING_RESOURCE = BaseTag(0x00080105)
_LONG_CODE_VALUE = BaseTag(0x00080119)
_URN_CODE_VALUE = BaseTag(0x00080120)
_REFERENCED_SOP_CLASS_UID = BaseTag(0x00081150)
_REFERENCED_SOP_INSTANCE_UID = BaseTag(0x00081155)
_REFERENCED_FRAME_NUMBER = BaseTag(0x00081160)
_REFERENCED_SERIES_SEQUENCE = BaseTag(0x00081115)
_REFERENCED_SOP_SEQUENCE = BaseTag(0x00081199)
_STUDY_INSTANCE_UID = BaseTag(0x0020000D)
_SERIES_INSTANCE_UID = BaseTag(0x0020000E)
_MEASUREMENT_UNITS_CODE_SEQUENCE = BaseTag(0x004008EA)
_PIXEL_ORIGIN_INTERPRETATION = BaseTag(0x00480301)
_RELATIONSHIP_TYPE = BaseTag(0x0040A010)
_VALUE_TYPE = BaseTag(0x0040A040)
_CONCEPT_NAME_CODE_SEQUENCE = BaseTag(0x0040A043)
_CONTINUITY_OF_CONTENT = BaseTag(0x0040A050)
_UID = BaseTag(0x0040A124)
_TEXT_VALUE = BaseTag(0x0040A160)
_FLOATING_POINT_VALUE = BaseTag(0x0040A161)
_CONCEPT_CODE_SEQUENCE = BaseTag(0x0040A168)
_MEASURED_VALUE_SEQUENCE = BaseTag(0x0040A300)
_NUMERIC_VALUE = BaseTag(0x0040A30A)
_CONTENT_TEMPLATE_SEQUENCE = BaseTag(0x0040A504)
_CONTENT_SEQUENCE = BaseTag(0x0040A730)
_TEMPLATE_IDENTIFIER = BaseTag(0x0040DB00)
_GRAPHIC_DATA = BaseTag(0x00700022)
_GRAPHIC_TYPE = BaseTag(0x00700023)


def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise NotHandled(f"unknown keyword {keyword}")
    return BaseTag(tag)


# Root (header) tags.
_HEADER_TAGS = {
    kw: _tag(kw)
    for kw in (
        "SpecificCharacterSet",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyDate",
        "SeriesDate",
        "ContentDate",
        "StudyTime",
        "SeriesTime",
        "ContentTime",
        "AccessionNumber",
        "Modality",
        "Manufacturer",
        "ReferringPhysicianName",
        "CodingSchemeIdentificationSequence",
        "SeriesDescription",
        "ManufacturerModelName",
        "ReferencedPerformedProcedureStepSequence",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "SoftwareVersions",
        "ContributingEquipmentSequence",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "StudyID",
        "SeriesNumber",
        "InstanceNumber",
        "PerformedProcedureCodeSequence",
        "CurrentRequestedProcedureEvidenceSequence",
        "CompletionFlag",
        "VerificationFlag",
        "PreliminaryFlag",
    )
}
# The attributes highdicom's SOPClass sets from the first evidence dataset and that its
# copy of the Patient and Study modules then replaces with the source's own elements.
_FROM_EVIDENCE = tuple(
    _tag(kw)
    for kw in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "StudyInstanceUID",
    )
)


def _el(tag: int, vr: str, value: Any) -> DataElement:
    return DataElement(tag, vr, value, validation_mode=_IGNORE)


# A new Dataset() sets a dozen attributes through Dataset.__setattr__ (~10 us); the same state is set
# here directly (~1.5 us): the fresh instance's attributes, with new empty dicts for its dicts.
_FRESH_STATE = Dataset().__dict__
_FRESH_VALUES = {k: v for k, v in _FRESH_STATE.items() if not isinstance(v, dict)}
_FRESH_DICTS = tuple(k for k, v in _FRESH_STATE.items() if isinstance(v, dict))
_FRESH_OK = all(v is None or isinstance(v, bool | int | float | str | dict) for v in _FRESH_STATE.values())


def _new_dataset() -> Dataset:
    if not _FRESH_OK:  # another pydicom: its own constructor
        return Dataset()
    ds = Dataset.__new__(Dataset)
    state = ds.__dict__
    state.update(_FRESH_VALUES)
    for k in _FRESH_DICTS:
        state[k] = {}
    return ds


def _ds(*elements: DataElement) -> Dataset:
    ds = _new_dataset()
    d = ds._dict
    for el in elements:
        d[el.tag] = el
    return ds


# --------------------------------------------------------------------------- content items


def code_item(value: str, scheme: str, meaning: str, version: str | None = None) -> Dataset:
    """highdicom's CodedConcept(value, scheme, meaning, version) as a plain dataset."""
    ds = _new_dataset()
    d = ds._dict
    if len(value) > 16:
        if value.startswith("urn") or "://" in value:
            d[_URN_CODE_VALUE] = _el(_URN_CODE_VALUE, "UR", str(value))
        else:
            d[_LONG_CODE_VALUE] = _el(_LONG_CODE_VALUE, "UC", str(value))
    else:
        d[_CODE_VALUE] = _el(_CODE_VALUE, "SH", str(value))
    if len(meaning) > 64:
        raise ValueError("Code meaning can have maximally 64 characters.")
    d[_CODE_MEANING] = _el(_CODE_MEANING, "LO", str(meaning))
    d[_CODING_SCHEME_DESIGNATOR] = _el(_CODING_SCHEME_DESIGNATOR, "SH", str(scheme))
    if version is not None:
        d[_CODING_SCHEME_VERSION] = _el(_CODING_SCHEME_VERSION, "SH", str(version))
    return ds


def _code(code: Any) -> Dataset:
    """A pydicom `Code` (or highdicom CodedConcept-like object) as a code item."""
    return code_item(code.value, code.scheme_designator, code.meaning, code.scheme_version)


def _item(value_type: str, name: Any, relationship: str | None) -> Dataset:
    ds = _ds(
        _el(_VALUE_TYPE, "CS", value_type),
        _el(_CONCEPT_NAME_CODE_SEQUENCE, "SQ", [_code(name)]),
    )
    if relationship is not None:
        ds._dict[_RELATIONSHIP_TYPE] = _el(_RELATIONSHIP_TYPE, "CS", relationship)
    return ds


def _text(name: Any, value: Any, relationship: str) -> Dataset:
    ds = _item("TEXT", name, relationship)
    ds._dict[_TEXT_VALUE] = _el(_TEXT_VALUE, "UT", str(value))
    return ds


def _uidref(name: Any, value: Any, relationship: str) -> Dataset:
    ds = _item("UIDREF", name, relationship)
    ds._dict[_UID] = _el(_UID, "UI", value)
    return ds


def _code_value(name: Any, value: Any, relationship: str) -> Dataset:
    ds = _item("CODE", name, relationship)
    ds._dict[_CONCEPT_CODE_SEQUENCE] = _el(_CONCEPT_CODE_SEQUENCE, "SQ", [_code(value)])
    return ds


def _container(name: Any, relationship: str | None, template_id: str | None, content: list[Dataset]) -> Dataset:
    ds = _item("CONTAINER", name, relationship)
    d = ds._dict
    d[_CONTINUITY_OF_CONTENT] = _el(_CONTINUITY_OF_CONTENT, "CS", "CONTINUOUS")
    if template_id is not None:
        template = _ds(_el(_MAPPING_RESOURCE, "CS", "DCMR"), _el(_TEMPLATE_IDENTIFIER, "CS", str(template_id)))
        d[_CONTENT_TEMPLATE_SEQUENCE] = _el(_CONTENT_TEMPLATE_SEQUENCE, "SQ", [template])
    d[_CONTENT_SEQUENCE] = _el(_CONTENT_SEQUENCE, "SQ", content)
    return ds


def _image(name: Any, relationship: str, sop_class: str, sop_uid: str, frames: list[int] | None) -> Dataset:
    ref = _ds(
        _el(_REFERENCED_SOP_CLASS_UID, "UI", str(sop_class)),
        _el(_REFERENCED_SOP_INSTANCE_UID, "UI", str(sop_uid)),
    )
    if frames is not None:
        if any(f < 1 for f in frames):
            raise NotHandled("frame number")
        ref._dict[_REFERENCED_FRAME_NUMBER] = _el(_REFERENCED_FRAME_NUMBER, "IS", frames)
    ds = _item("IMAGE", name, relationship)
    ds._dict[_REFERENCED_SOP_SEQUENCE] = _el(_REFERENCED_SOP_SEQUENCE, "SQ", [ref])
    return ds


@lru_cache(maxsize=64)
def _in_iod(keyword: str, sop_class_uid: str) -> bool:
    from highdicom._standard_utils import is_attribute_in_iod

    return bool(is_attribute_in_iod(keyword, sop_class_uid))


def measurement_group(f: Finding, tracking_uid: str, manufacturer: str | None) -> Dataset:
    """One finding's measurement group: the tree `sr._measurement_group` makes with highdicom."""
    from screener.dicom import sr as S

    e = f.engine
    code = e.finding_code
    hcm, hoc, contains = "HAS CONCEPT MOD", "HAS OBS CONTEXT", "CONTAINS"
    site = _code_value(_FINDING_SITE_NAME, S.FINDING_SITE, hcm)
    if f.laterality:
        lat = _code_value(_LATERALITY_NAME, S.LATERALITY[f.laterality], hcm)
        site._dict[_CONTENT_SEQUENCE] = _el(_CONTENT_SEQUENCE, "SQ", [lat])
    percent = round(float(f.probability) * 100.0, S.PERCENT_DECIMALS)
    measured = _ds(
        _el(_NUMERIC_VALUE, "DS", DS(percent, auto_format=True)),
        _el(_FLOATING_POINT_VALUE, "FD", percent),
        _el(_MEASUREMENT_UNITS_CODE_SEQUENCE, "SQ", [_code(S.PERCENT)]),
    )
    num = _item("NUM", S.CERTAINTY, contains)
    num._dict[_MEASURED_VALUE_SEQUENCE] = _el(_MEASURED_VALUE_SEQUENCE, "SQ", [measured])
    content = [
        _text(_TRACKING_IDENTIFIER, S.finding_tracking_identifier(f), hoc),
        _uidref(_TRACKING_UID, tracking_uid, hoc),
        _code_value(_FINDING, code, contains),
        site,
        _text(_ALGORITHM_NAME, e.name, hcm),
        _text(_ALGORITHM_VERSION, e.version, hcm),
        *([_text(_ALGORITHM_MANUFACTURER, manufacturer, hcm)] if manufacturer is not None else []),
        *(_text(_ALGORITHM_PARAMETERS, p, hcm) for p in e.parameters()),
        _code_value(_ALGORITHM_FAMILY, S.ALGORITHM_FAMILY, hcm),
        num,
        _code_value(code, S.PRESENT if f.present else S.ABSENT, contains),
    ]
    sop_class, sop_uid = str(f.source.SOPClassUID), str(f.source.SOPInstanceUID)
    frames = [1] if int(f.source.get("NumberOfFrames") or 1) > 1 else None
    if f.roi is None:
        content.append(_image(_SOURCE_OF_MEASUREMENT, contains, sop_class, sop_uid, frames))
        return _container(_MEASUREMENT_GROUP, contains, "1501", content)
    origin = "FRAME" if frames and S._multiframe_iod(sop_class) else None
    points = S._roi_polyline(f.roi, f.source)
    if _in_iod("NumberOfFrames", sop_class):
        if origin is None and sop_class == VLWholeSlideMicroscopyImageStorage:
            raise NotHandled("whole slide image")
    elif origin is not None:
        raise NotHandled("pixel origin for a single-frame IOD")
    region = _item("SCOORD", _IMAGE_REGION, contains)
    d = region._dict
    d[_GRAPHIC_DATA] = _el(_GRAPHIC_DATA, "FL", points.flatten().tolist())
    d[_GRAPHIC_TYPE] = _el(_GRAPHIC_TYPE, "CS", "POLYLINE")
    if origin is not None:
        d[_PIXEL_ORIGIN_INTERPRETATION] = _el(_PIXEL_ORIGIN_INTERPRETATION, "CS", origin)
    source = _image(_SOURCE, "SELECTED FROM", sop_class, sop_uid, frames)
    d[_CONTENT_SEQUENCE] = _el(_CONTENT_SEQUENCE, "SQ", [source])
    content.append(region)
    return _container(_MEASUREMENT_GROUP, contains, "1410", content)


class _Concept:
    """A code given by its parts (highdicom writes these TID 4019 names itself)."""

    def __init__(self, value: str, meaning: str, scheme: str = "DCM") -> None:
        self.value, self.meaning, self.scheme_designator, self.scheme_version = value, meaning, scheme, None


_FINDING_SITE_NAME = codes.SCT.FindingSite
_LATERALITY_NAME = codes.SCT.Laterality
_TRACKING_IDENTIFIER = codes.DCM.TrackingIdentifier
_TRACKING_UID = codes.DCM.TrackingUniqueIdentifier
_FINDING = codes.DCM.Finding
_SOURCE_OF_MEASUREMENT = codes.DCM.SourceOfMeasurement
_MEASUREMENT_GROUP = codes.DCM.MeasurementGroup
_IMAGE_REGION = codes.DCM.ImageRegion
_SOURCE = _Concept("260753009", "Source", "SCT")  # highdicom's meaning, not pydicom's "Source (attribute)"
_ALGORITHM_NAME = _Concept("111001", "Algorithm Name")
_ALGORITHM_VERSION = _Concept("111003", "Algorithm Version")
_ALGORITHM_MANUFACTURER = _Concept("122405", "Algorithm Manufacturer")
_ALGORITHM_PARAMETERS = _Concept("111002", "Algorithm Parameters")
_ALGORITHM_FAMILY = _Concept("111000", "Algorithm Family")
_LANGUAGE = _Concept("121049", "Language of Content Item and Descendants")
_ENGLISH_US = _Concept("en-US", "English (United States)", "RFC5646")
_OBSERVER_TYPE = _Concept("121005", "Observer Type")
_DEVICE_OBSERVER_UID = _Concept("121012", "Device Observer UID")
_DEVICE_OBSERVER_NAME = _Concept("121013", "Device Observer Name")
_DEVICE_OBSERVER_MANUFACTURER = _Concept("121014", "Device Observer Manufacturer")
_DEVICE_OBSERVER_MODEL = _Concept("121015", "Device Observer Model Name")
_PROCEDURE_REPORTED = _Concept("121058", "Procedure reported")
_IMAGING_MEASUREMENTS = _Concept("126010", "Imaging Measurements")


def report_content(
    groups: list[Dataset], device_uid: str, device_name: str | None, manufacturer: str | None, model_name: str | None
) -> Dataset:
    """The TID 1500 root container (MeasurementReport) around the measurement groups."""
    from screener.dicom import sr as S

    hoc = "HAS OBS CONTEXT"
    content = [
        _code_value(_LANGUAGE, _ENGLISH_US, "HAS CONCEPT MOD"),
        _code_value(_OBSERVER_TYPE, S.OBSERVER_DEVICE, hoc),
        _uidref(_DEVICE_OBSERVER_UID, device_uid, hoc),
    ]
    if device_name is not None:
        content.append(_text(_DEVICE_OBSERVER_NAME, device_name, hoc))
    if manufacturer is not None:
        content.append(_text(_DEVICE_OBSERVER_MANUFACTURER, manufacturer, hoc))
    if model_name is not None:
        content.append(_text(_DEVICE_OBSERVER_MODEL, model_name, hoc))
    content.append(_code_value(_PROCEDURE_REPORTED, S.PROCEDURE_REPORTED, "HAS CONCEPT MOD"))
    content.append(_container(_IMAGING_MEASUREMENTS, "CONTAINS", None, groups))
    return _container(S.TITLE, None, "1500", content)


# --------------------------------------------------------------------------- header


@lru_cache(maxsize=64)
def _patient_study_tags(sop_class_uid: str) -> tuple[BaseTag, ...]:
    """The root attributes of the Patient and Study modules of the IOD of `sop_class_uid`: what
    highdicom's `copy_patient_and_study_information` copies (in its order)."""
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

    modules = get_iod_module_map()[get_sop_class_iod_map()[sop_class_uid]]
    attributes = get_module_attribute_map()
    tags: list[BaseTag] = []
    for ie in ("Patient", "Study"):
        for module in modules:
            if module["ie"] != ie:
                continue
            for item in attributes[module["key"]]:
                if len(item["path"]) == 0:
                    tag = tag_for_keyword(str(item["keyword"]))
                    if tag is None:
                        raise NotHandled("unknown keyword")
                    tags.append(BaseTag(tag))
    return tuple(tags)


@lru_cache(maxsize=64)
def _has_pixel_data(sop_class_uid: str) -> bool:
    from highdicom._standard_utils import does_iod_have_pixel_data

    return bool(does_iod_have_pixel_data(sop_class_uid))


def _acquisition_equipment(dataset: Dataset) -> Dataset:
    """highdicom's `ContributingEquipment.for_image_acquisition`, with its IOD look-up (~3 ms) cached."""
    from highdicom.base_content import ContributingEquipment

    if not _has_pixel_data(dataset.SOPClassUID):
        raise ValueError("Dataset does not represent an Image.")
    manufacturer = dataset.get("Manufacturer")
    if manufacturer is None or manufacturer == "":
        raise AttributeError("Dataset has no manufacturer information.")
    contribution_datetime = dataset.get("AcquisitionDateTime")
    if contribution_datetime is None:
        date, time = dataset.get("AcquisitionDate"), dataset.get("AcquisitionTime")
        if isinstance(date, datetime.date) and isinstance(time, datetime.time):
            contribution_datetime = datetime.datetime.combine(dataset.AcquisitionDate, dataset.AcquisitionTime)
    return ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.AcquisitionEquipment,
        manufacturer_model_name=dataset.get("ManufacturerModelName"),
        software_versions=dataset.get("SoftwareVersions"),
        device_serial_number=dataset.get("DeviceSerialNumber"),
        institution_name=dataset.get("InstitutionName"),
        institutional_department_name=dataset.get("InstitutionalDepartmentName"),
        institution_address=dataset.get("InstitutionAddress"),
        station_name=dataset.get("StationName"),
        contribution_datetime=contribution_datetime,
        contribution_description="Acquisition equipment of the source image(s)",
    )


def header(
    evidence: Sequence[Dataset],
    content: Dataset,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    manufacturer: str | None,
    is_final: bool,
    series_description: str,
    manufacturer_model_name: str | None,
    software_versions: str,
    when: datetime.datetime,
    coding_schemes: list[Any],
) -> Dataset:
    """What `Comprehensive3DSR(evidence, content, ..., is_complete=True, is_verified=False, ...)` builds
    with the arguments of `build_sr_reference`, with `content` (a plain dataset) as its content root."""
    from highdicom.base_content import ContributingEquipment
    from highdicom.enum import PatientSexValues
    from highdicom.valuerep import _check_long_string, _check_specific_character_set, check_person_name
    from highdicom.version import __version__ as highdicom_version

    if len(evidence) == 0:
        raise NotHandled("no evidence")
    first = evidence[0]
    specific_character_set = first.get("SpecificCharacterSet")
    # The arguments highdicom's _SR passes to SOPClass (AttributeError when one is missing).
    patient_name = first.PatientName
    patient_birth_date = first.PatientBirthDate
    patient_sex = first.PatientSex
    study_date, study_time = first.StudyDate, first.StudyTime
    for kw in ("PatientID", "AccessionNumber", "StudyID", "StudyInstanceUID"):
        getattr(first, kw)
    referring = getattr(first, "ReferringPhysicianName", None)
    copied = _patient_study_tags(str(first.SOPClassUID))
    if not all(tag in copied for tag in _FROM_EVIDENCE):
        raise NotHandled("IOD without the Patient / General Study attributes")
    if series_number is None or instance_number is None or series_number < 1 or instance_number < 1:
        raise NotHandled("series or instance number")

    t = _HEADER_TAGS
    sr = Dataset()
    sr.preamble = b"\x00" * 128
    meta = FileMetaDataset()
    md = meta._dict
    for tag, vr, value in (
        (0x00020010, "UI", UID(ExplicitVRLittleEndian)),
        (0x00020002, "UI", UID(Comprehensive3DSRStorage)),
        (0x00020003, "UI", UID(sop_instance_uid)),
        (0x00020001, "OB", b"\x00\x01"),
        (0x00020012, "UI", UID("1.2.826.0.1.3680043.9.7433.1.1")),
        (0x00020013, "SH", f"highdicom{highdicom_version}"),
    ):
        md[BaseTag(tag)] = _el(tag, vr, value)
    with io.BytesIO() as fp:
        write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
        meta.FileMetaInformationGroupLength = len(fp.getvalue())
    sr.file_meta = meta

    # SOPClass.__init__: the checks and conversions it makes (the values it sets from the evidence are
    # replaced below by the copied elements).
    if patient_name is not None:
        try:
            check_person_name(patient_name)
        except ValueError:
            pass  # highdicom only logs this (with the name): not repeated here
    DA(patient_birth_date)
    if patient_sex is not None and patient_sex != "":
        PatientSexValues(patient_sex)
    if study_date is not None:
        DA(study_date)
    if study_time is not None:
        TM(study_time)
    _check_long_string(series_description)
    if manufacturer is not None:
        _check_long_string(manufacturer)
    if manufacturer_model_name is not None:
        _check_long_string(manufacturer_model_name)
    if not isinstance(software_versions, str):
        raise NotHandled("software versions")
    _check_long_string(software_versions)
    d = sr._dict
    d[t["ReferringPhysicianName"]] = _el(t["ReferringPhysicianName"], "PN", referring)
    d[t["SeriesInstanceUID"]] = _el(t["SeriesInstanceUID"], "UI", str(series_instance_uid))
    d[t["SeriesNumber"]] = _el(t["SeriesNumber"], "IS", series_number)
    d[t["Modality"]] = _el(t["Modality"], "CS", "SR")
    d[t["SeriesDescription"]] = _el(t["SeriesDescription"], "LO", series_description)
    d[t["Manufacturer"]] = _el(t["Manufacturer"], "LO", manufacturer)
    if manufacturer_model_name is not None:
        d[t["ManufacturerModelName"]] = _el(t["ManufacturerModelName"], "LO", manufacturer_model_name)
    d[t["SoftwareVersions"]] = _el(t["SoftwareVersions"], "LO", software_versions)
    d[t["SOPInstanceUID"]] = _el(t["SOPInstanceUID"], "UI", str(sop_instance_uid))
    d[t["SOPClassUID"]] = _el(t["SOPClassUID"], "UI", str(Comprehensive3DSRStorage))
    d[t["InstanceNumber"]] = _el(t["InstanceNumber"], "IS", instance_number)
    if specific_character_set is not None:
        charset = _check_specific_character_set(specific_character_set)
        d[t["SpecificCharacterSet"]] = _el(t["SpecificCharacterSet"], "CS", charset)
    content_date, content_time = DA(when.date()), TM(when.time())
    d[t["ContentDate"]] = _el(t["ContentDate"], "DA", content_date)
    d[t["ContentTime"]] = _el(t["ContentTime"], "TM", content_time)
    d[t["SeriesDate"]] = _el(t["SeriesDate"], "DA", DA(when.date()))
    d[t["SeriesTime"]] = _el(t["SeriesTime"], "TM", TM(when.time()))
    # build_sr replaces highdicom's "now" with the content date and time.
    d[t["InstanceCreationDate"]] = _el(t["InstanceCreationDate"], "DA", d[t["ContentDate"]].value)
    d[t["InstanceCreationTime"]] = _el(t["InstanceCreationTime"], "TM", d[t["ContentTime"]].value)
    d[t["CodingSchemeIdentificationSequence"]] = _el(t["CodingSchemeIdentificationSequence"], "SQ", coding_schemes)

    # _SR.__init__
    d[t["CompletionFlag"]] = _el(t["CompletionFlag"], "CS", "COMPLETE")
    d[t["VerificationFlag"]] = _el(t["VerificationFlag"], "CS", "UNVERIFIED")
    d[t["PreliminaryFlag"]] = _el(t["PreliminaryFlag"], "CS", "FINAL" if is_final else "PRELIMINARY")
    for tag, el in content._dict.items():
        d[tag] = el
    study_uid = str(first.StudyInstanceUID)
    by_series: dict[tuple[Any, Any], list[Dataset]] = {}
    seen: set[Any] = set()
    for evd in evidence:
        if evd.SOPInstanceUID in seen:
            continue
        if evd.StudyInstanceUID != study_uid:
            raise NotHandled("evidence from another study")
        item = _ds(
            _el(_REFERENCED_SOP_CLASS_UID, "UI", evd.SOPClassUID),
            _el(_REFERENCED_SOP_INSTANCE_UID, "UI", evd.SOPInstanceUID),
        )
        by_series.setdefault((evd.StudyInstanceUID, evd.SeriesInstanceUID), []).append(item)
        seen.add(evd.SOPInstanceUID)
    by_study: dict[Any, list[Dataset]] = {}
    for (study, series), items in by_series.items():
        series_item = _ds(
            _el(_SERIES_INSTANCE_UID, "UI", series),
            _el(_REFERENCED_SOP_SEQUENCE, "SQ", items),
        )
        by_study.setdefault(study, []).append(series_item)
    evidence_items = [
        _ds(_el(_STUDY_INSTANCE_UID, "UI", study), _el(_REFERENCED_SERIES_SEQUENCE, "SQ", series_items))
        for study, series_items in by_study.items()
    ]
    if evidence_items:
        tag = t["CurrentRequestedProcedureEvidenceSequence"]
        d[tag] = _el(tag, "SQ", evidence_items)
    d[t["PerformedProcedureCodeSequence"]] = _el(t["PerformedProcedureCodeSequence"], "SQ", [])
    tag = t["ReferencedPerformedProcedureStepSequence"]
    d[tag] = _el(tag, "SQ", [])

    # copy_patient_and_study_information: the source's own elements
    for tag in copied:
        if tag in first:
            d[tag] = first[tag]

    # _add_contributing_equipment
    equipment: list[Dataset] = []
    try:
        equipment.append(_acquisition_equipment(first))
    except Exception:  # noqa: BLE001 - as highdicom: no acquisition item
        pass
    equipment.append(ContributingEquipment.for_highdicom())
    for item in equipment:
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(when)
    tag = t["ContributingEquipmentSequence"]
    d[tag] = _el(tag, "SQ", equipment)
    return sr
