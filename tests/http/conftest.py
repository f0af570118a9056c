"""Fixtures for the HTTP side: a store with a few studies in known states behind a NodeView double."""

from __future__ import annotations

import dataclasses
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from screener import config
from screener.http.auth import Authenticator, hash_secret
from screener.http.health import Echoer
from screener.http.status import NodeView
from screener.store import Store

DX = "1.2.840.10008.5.1.4.1.1.1.1"
REPORTED = "1.2.826.0.1.3680043.8.498.101"
FAILED = "1.2.826.0.1.3680043.8.498.102"
RECEIVING = "1.2.826.0.1.3680043.8.498.103"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-98765"
BIRTH_DATE = "19610203"
USER, PASSWORD, TOKEN = "admin", "correct horse battery", "s3cret-token-value"
PACS = config.Destination("PACS", "127.0.0.1", 104)


def part10(sop_uid: str, study_uid: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid + ".1"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def put(store: Store, sop_uid: str, study_uid: str) -> None:
    store.store_instance(
        part10(sop_uid, study_uid),
        sop_class_uid=DX,
        sop_instance_uid=sop_uid,
        study_uid=study_uid,
        series_uid=study_uid + ".1",
        transfer_syntax=ExplicitVRLittleEndian,
        calling_aet="MODALITY",
        address="127.0.0.1",
    )


def fake_engine(version: str = "demo-spondylosis", validated: bool = False, demo: bool = True):
    manifest = SimpleNamespace(
        version=version, validated=validated, validated_by="", demo=demo, threshold=SimpleNamespace(value=0.42)
    )
    return SimpleNamespace(manifest=manifest, backend=SimpleNamespace(name="onnx-fp32"))


def populate(store: Store) -> None:
    """REPORTED: one image with a present finding, SR written and sent. FAILED: SR written, sending
    gave up. RECEIVING: one image, still arriving."""
    put(store, REPORTED + ".1", REPORTED)
    store.force_complete(REPORTED)
    store.set_study_state(REPORTED, "screening", expect=("complete",))
    store.record_result(
        REPORTED + ".1", "spondylosis", "demo-spondylosis", "onnx-fp32", 0.91, "present", 0.42, seconds=0.02
    )
    store.set_instance_state(REPORTED + ".1", "screened")
    sr = f"sr/{REPORTED}/9.9.9.dcm"
    store.set_study_state(REPORTED, "reported", expect=("screening",), sr_path=sr, sr_sop_instance_uid="9.9.9")
    oid = store.enqueue(REPORTED, "PACS@127.0.0.1:104", sr)
    store.mark_sent(oid)

    put(store, FAILED + ".1", FAILED)
    store.force_complete(FAILED)
    store.record_result(
        FAILED + ".1", "spondylosis", "demo-spondylosis", "onnx-fp32", 0.10, "absent", 0.42, seconds=0.02
    )
    sr2 = f"sr/{FAILED}/9.9.8.dcm"
    store.set_study_state(FAILED, "reported", sr_path=sr2, sr_sop_instance_uid="9.9.8")
    oid = store.enqueue(FAILED, "PACS@127.0.0.1:104", sr2)
    store.mark_attempt_failed(oid, "association rejected", 0.0, give_up=True)

    put(store, RECEIVING + ".1", RECEIVING)


@dataclasses.dataclass
class Flags:
    listener: bool = True
    scheduler: bool = True


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "var")
    populate(s)
    yield s
    s.close()


@pytest.fixture
def flags():
    return Flags()


def make_settings(tmp_path: Path, **http) -> config.Settings:
    base = config.Settings()
    node = dataclasses.replace(base.node, var_dir=str(tmp_path / "var"), min_free_mb=1)
    engines = dataclasses.replace(base.engines, enabled=["spondylosis"])
    return dataclasses.replace(
        base, node=node, engines=engines, destinations=[PACS], http=dataclasses.replace(base.http, **http)
    )


@pytest.fixture
def make_view(tmp_path, store, flags):
    def make(echo_ok: bool | None = True, **http) -> NodeView:
        settings = make_settings(tmp_path, **http)
        echoer = Echoer(settings.destinations, "CSPINE", probe=lambda d, a, t: (bool(echo_ok), "fake echo"))
        if echo_ok is not None:
            echoer.check_now()
        return NodeView(
            settings=settings,
            store=store,
            engines={"spondylosis": fake_engine()},
            version="0.1.0",
            listener_up=lambda: flags.listener,
            scheduler_up=lambda: flags.scheduler,
            dicom_port=lambda: 11112,
            echoer=echoer,
        )

    return make


@pytest.fixture
def client_for(make_view):
    """client_for(auth=..., **http settings) -> Starlette TestClient of the app."""
    from starlette.testclient import TestClient

    from screener.http.app import create_app

    clients = []

    def make(auth: Authenticator | None = None, echo_ok: bool | None = True, **http):
        c = TestClient(create_app(make_view(echo_ok, **http), auth), base_url="http://127.0.0.1:8080")
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def credentials():
    """Basic auth + bearer token, hashed with few iterations (fast tests)."""
    return {
        "basic_user": USER,
        "basic_password_hash": hash_secret(PASSWORD, iterations=1000),
        "token_hash": hash_secret(TOKEN, iterations=1000),
    }
