"""Loopback peers for node tests: a storage SCP that collects SRs, and a pynetdicom SCU."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage, ComprehensiveSRStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from screener import config
from screener.engine.preprocessing import read_image_gray8


class CollectingSCP:
    """A test PACS: accepts SRs and keeps them in memory."""

    def __init__(self, ae_title: str = "TESTPACS", port: int = 0) -> None:
        self.ae_title = ae_title
        self.received: list = []
        self.port = port
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    def _on_store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def start(self) -> CollectingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        for sop in (Comprehensive3DSRStorage, ComprehensiveSRStorage):
            ae.add_supported_context(sop)
        ae.add_supported_context(Verification)
        server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None  # block=False returns the server
        self._server = server
        self.port = server.server_address[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    @property
    def destination(self) -> config.Destination:
        return config.Destination(self.ae_title, "127.0.0.1", self.port)

    def wait_for(self, n: int = 1, timeout: float = 90.0) -> list:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                if len(self.received) >= n:
                    return list(self.received)
            time.sleep(0.1)
        raise AssertionError(f"expected {n} SR(s), got {len(self.received)} after {timeout} s")


def send_images(datasets, port: int, called: str = "CSPINE", calling: str = "MODALITY") -> list[int]:
    """C-STORE datasets to the node; returns the status codes."""
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association with the node failed"
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def node_settings(var: Path, engines_dir: Path, destinations, enabled=("spondylosis",), **schedule) -> config.Settings:
    base = config.load("config.toml")
    sched = dataclasses.replace(
        base.schedule,
        **{"study_stable_s": 0.5, "batch_interval_s": 0.2, "send_backoff_s": 0.2, "send_retries": 50, **schedule},
    )
    node = dataclasses.replace(base.node, port=0, host="127.0.0.1", var_dir=str(var), min_free_mb=1)
    engines = dataclasses.replace(base.engines, dir=str(engines_dir), backend="onnx-fp32", enabled=list(enabled))
    logging = dataclasses.replace(base.logging, level="warning")
    http = dataclasses.replace(base.http, enabled=False)  # tests/http turn it on, on a free port
    return dataclasses.replace(
        base, node=node, schedule=sched, engines=engines, destinations=list(destinations), logging=logging, http=http
    )


def synth_gray(data_dir: Path, index: int = 0, max_side: int = 512) -> np.ndarray:
    import cv2

    pngs = sorted((data_dir / "datasets-PNG").glob("*.png"))
    g = read_image_gray8(str(pngs[index]))
    scale = max_side / max(g.shape)
    if scale < 1:
        g = cv2.resize(g, (int(g.shape[1] * scale), int(g.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return g
