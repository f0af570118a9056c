"""Every transfer syntax the node offers, made by real encoders, sent to the listener and decoded
(issue 10 item 5: 12-bit JPEG Extended was offered but nothing decoded it).

DCMTK makes the JPEG (dcmcjpeg: baseline, extended 12-bit, lossless, lossless SV1), JPEG-LS
(dcmcjpls: lossless, near-lossless), RLE (dcmcrle) and the native/Deflated encodings (dcmconv);
JPEG 2000 comes from OpenJPEG through pylibjpeg-openjpeg (pydicom's `Dataset.compress`). Lossless
syntaxes must give the original pixels exactly, lossy ones close to them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import pixel_array

from screener.config import NodeSettings, Settings
from screener.dicom.image import dataset_to_gray8, read_spooled
from screener.dicom.listener import TRANSFER_SYNTAXES, Listener
from screener.store import Store
from tests.support.dicom_factory import make_dx, make_study_ids, save

TOOLS = ("dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmconv")
pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in TOOLS), reason="DCMTK (dcmcjpeg, dcmcjpls, dcmcrle, dcmconv) not installed"
)

# syntax -> (source bits, command or "pydicom", max abs error allowed in stored values). +sr: dcmcjpeg keeps
# the stored value range (its default +sp stretches min..max to the full range for lossy modes).
ENCODINGS: dict[str, tuple[int, list[str] | str, int]] = {
    "1.2.840.10008.1.2.1": (12, [], 0),
    "1.2.840.10008.1.2": (12, ["dcmconv", "+ti"], 0),
    "1.2.840.10008.1.2.2": (12, ["dcmconv", "+tb"], 0),
    "1.2.840.10008.1.2.1.99": (12, ["dcmconv", "+td"], 0),
    "1.2.840.10008.1.2.4.50": (8, ["dcmcjpeg", "+eb", "+sr"], 12),
    "1.2.840.10008.1.2.4.51": (12, ["dcmcjpeg", "+ee", "+sr"], 48),
    "1.2.840.10008.1.2.4.57": (12, ["dcmcjpeg", "+el"], 0),
    "1.2.840.10008.1.2.4.70": (12, ["dcmcjpeg", "+e1"], 0),
    "1.2.840.10008.1.2.4.80": (12, ["dcmcjpls", "+el"], 0),
    "1.2.840.10008.1.2.4.81": (12, ["dcmcjpls", "+en"], 2),
    "1.2.840.10008.1.2.4.90": (12, "pydicom", 0),
    "1.2.840.10008.1.2.4.91": (12, "pydicom", 48),
    "1.2.840.10008.1.2.5": (12, ["dcmcrle"], 0),
}


def test_every_offered_syntax_has_an_encoding_here():
    assert set(ENCODINGS) == set(TRANSFER_SYNTAXES)


def phantom(bits: int) -> np.ndarray:
    """A smooth image with edges (what a radiograph looks like to a codec), 8-bit gray."""
    y, x = np.mgrid[0:96, 0:80]
    g = 60 + 100 * np.exp(-(((x - 40) / 18.0) ** 2)) + 0.5 * y
    g[30:60, 30:50] += 60
    return np.clip(g, 0, 255).astype(np.uint8)


def encode(syntax: str, folder: Path) -> tuple[Path, np.ndarray, int]:
    bits, how, tolerance = ENCODINGS[syntax]
    ds = make_dx(phantom(bits), make_study_ids(), "LL", bits=bits)
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        ds.PixelData = phantom(8).tobytes()
    original = pixel_array(ds).copy()
    src = folder / f"{syntax}-src.dcm"
    out = folder / f"{syntax}.dcm"
    save(ds, src)
    if how == "pydicom":
        kw = {} if syntax.endswith(".90") else {"j2k_cr": [20]}
        ds.compress(syntax, **kw)
        save(ds, out)
    elif how:
        r = subprocess.run([*how, str(src), str(out)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    else:
        shutil.copy(src, out)
    assert str(pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    return out, original, tolerance


def test_send_and_decode_every_offered_transfer_syntax(tmp_path):
    from pynetdicom import AE, _config

    files = {ts: encode(ts, tmp_path) for ts in TRANSFER_SYNTAXES}
    settings = Settings(node=NodeSettings(host="127.0.0.1", port=0, var_dir=str(tmp_path / "var"), min_free_mb=0))
    store = Store.open(tmp_path / "var")
    listener = Listener(settings, store)
    listener.start()
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the encoder's bytes as they are
    try:
        ae = AE(ae_title="ENCODERS")
        for ts in TRANSFER_SYNTAXES:
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ts)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="CSPINE")
        assert assoc.is_established
        assert len(assoc.accepted_contexts) == len(TRANSFER_SYNTAXES)  # every one is offered
        for ts, (path, _, _) in files.items():
            assert assoc.send_c_store(path).Status == 0x0000, ts
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        listener.stop()
    problems = []
    for ts, (path, original, tolerance) in files.items():
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        row = store.get_instance(sop)
        ds = read_spooled(store.abs_path(row.path))
        if str(ds.file_meta.TransferSyntaxUID) != ts:
            problems.append(f"{ts}: stored as {ds.file_meta.TransferSyntaxUID}")
            continue
        try:
            decoded = pixel_array(ds).astype(np.int64)
            gray = dataset_to_gray8(ds)
        except Exception as exc:  # noqa: BLE001 - collected, reported together
            problems.append(f"{ts}: {type(exc).__name__}: {exc}")
            continue
        err = int(np.abs(decoded - original.astype(np.int64)).max())
        if err > tolerance:
            problems.append(f"{ts}: max error {err} > {tolerance}")
        if gray.shape != original.shape:
            problems.append(f"{ts}: gray shape {gray.shape}")
    store.close()
    assert problems == []
