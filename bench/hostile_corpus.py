"""A hostile / merely buggy sender's corpus, sent to a running node (issue 10's closing figures).

    python -m bench.hostile_corpus --out /tmp/hostile [--engines DIR] [--flips 2] [--max-files N]

1. Corpus: every bundled pydicom test file (pydicom/data/test_files/*.dcm, local only, no download)
   that has pixel data, re-tagged as a DX For Presentation lateral C-spine image (new UIDs, one
   study per source file), plus mutated copies of each: truncated (50 % and 90 % of the bytes),
   byte-flipped (``--flips`` seeds, 16 bytes each in the last 70 %), header/codestream mismatches
   (Rows + 1; 65535 x 65535; Samples per Pixel 3 on a 1-component stream), and one deflate bomb
   (a Deflated data set that inflates to ``--bomb-mb`` MiB).
2. Node: ``screener serve`` in a subprocess (own var folder, a free port, ``--engines`` or a small
   demo engine built on the spot, study_stable_s 1 s). Its memory is sampled (RSS of the node and
   its children, and the kernel's peak VmHWM) from /proc.
3. Send: each file raw, as stored (pynetdicom with chunked sending: the bytes are not re-encoded,
   so truncated and corrupt files reach the node as they are), one association per batch of 50.
   A node that dies is counted as a crash and restarted.
4. Wait until every instance is in a terminal state (bounded by ``--wait-s``), restart the node once
   more (recovery must not crash either) and print: files sent, C-STORE statuses, node crashes,
   instances per state and not in a terminal state, the node's peak memory.

Mutation helpers (`retag`, `mutations`, `write_deflate_bomb`) are also used by the tests.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

DX = "1.2.840.10008.5.1.4.1.1.1.1"
TERMINAL = ("reported", "sent", "skipped", "failed")


# --------------------------------------------------------------------------- corpus


def bundled_test_files() -> list[Path]:
    """pydicom's bundled test files (local folder only: get_testdata_files may try to download)."""
    folder = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(folder.glob("*.dcm"))


def retag(ds: pydicom.Dataset, study_uid: str | None = None) -> pydicom.Dataset:
    """Make `ds` a DX For Presentation lateral C-spine image with fresh UIDs (pixels untouched)."""
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.ViewPosition = "LL"
    ds.BodyPartExamined = "CSPINE"
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(DX)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _save(ds: pydicom.Dataset, path: Path) -> None:
    ds.save_as(str(path), enforce_file_format=True)


def mutations(base: Path, out: Path, flips: int = 2) -> Iterator[tuple[str, Path]]:
    """Mutated copies of the re-tagged file `base`: (kind, path). Each copy has its own SOP Instance UID."""
    data = base.read_bytes()
    stem = base.stem
    for frac in (0.5, 0.9):
        # a truncated copy keeps the header: give it its own instance UID by rewriting the header first
        ds = pydicom.dcmread(base)
        retag(ds, str(ds.StudyInstanceUID))
        tmp = out / f"{stem}-trunc{int(frac * 100)}.dcm"
        _save(ds, tmp)
        whole = tmp.read_bytes()
        tmp.write_bytes(whole[: max(200, int(len(whole) * frac))])
        yield f"truncated {int(frac * 100)}%", tmp
    for seed in range(flips):
        ds = pydicom.dcmread(base)
        retag(ds, str(ds.StudyInstanceUID))
        p = out / f"{stem}-flip{seed}.dcm"
        _save(ds, p)
        b = bytearray(p.read_bytes())
        rng = np.random.default_rng(seed)
        lo = int(len(b) * 0.3)
        for i in rng.integers(lo, len(b), 16):
            b[int(i)] ^= 0xFF
        p.write_bytes(bytes(b))
        yield "byte-flipped", p

    def rows_plus_one(d: pydicom.Dataset) -> None:
        d.Rows = int(d.Rows) + 1

    def huge(d: pydicom.Dataset) -> None:
        d.Rows = d.Columns = 65535

    def samples3(d: pydicom.Dataset) -> None:
        d.SamplesPerPixel, d.PhotometricInterpretation, d.PlanarConfiguration = 3, "RGB", 0

    edits = {"rows+1": rows_plus_one, "65535x65535": huge, "samples3": samples3}
    for kind, edit in edits.items():
        try:
            ds = pydicom.dcmread(base)
            if "Rows" not in ds:
                continue
            retag(ds, str(ds.StudyInstanceUID))
            edit(ds)
            p = out / f"{stem}-{kind.replace('+', 'p')}.dcm"
            _save(ds, p)
        except Exception:  # noqa: BLE001 - a source pydicom cannot rewrite is left out
            continue
        yield kind, p
    del data


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _text(value: str, pad: bytes = b" ") -> bytes:
    b = value.encode("ascii")
    return b + pad if len(b) % 2 else b


def write_deflate_bomb(path: Path, inflated_mb: int, rows: int = 64, cols: int = 64, study_uid: str = "") -> str:
    """A Deflated Explicit VR Little Endian DX file whose data set inflates to about `inflated_mb`
    MiB (a zero-filled OB element after a valid header), written in bounded memory. Returns its
    SOP Instance UID."""
    sop = generate_uid()
    study = study_uid or generate_uid()
    header = b"".join(
        [
            _element(0x00080016, b"UI", _text(DX, b"\0")),
            _element(0x00080018, b"UI", _text(sop, b"\0")),
            _element(0x00080060, b"CS", _text("DX")),
            _element(0x00185101, b"CS", _text("LL")),
            _element(0x0020000D, b"UI", _text(study, b"\0")),
            _element(0x0020000E, b"UI", _text(generate_uid(), b"\0")),
            _element(0x00280002, b"US", struct.pack("<H", 1)),
            _element(0x00280004, b"CS", _text("MONOCHROME2")),
            _element(0x00280010, b"US", struct.pack("<H", rows)),
            _element(0x00280011, b"US", struct.pack("<H", cols)),
            _element(0x00280100, b"US", struct.pack("<H", 16)),
            _element(0x00280101, b"US", struct.pack("<H", 12)),
            _element(0x00280102, b"US", struct.pack("<H", 11)),
            _element(0x00280103, b"US", struct.pack("<H", 0)),
        ]
    )
    size = inflated_mb << 20
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, size)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(DX)
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    from pydicom.filewriter import write_file_meta_info

    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + buf.getvalue())
        f.write(comp.compress(header + pixel_header))
        for _ in range(inflated_mb):
            f.write(comp.compress(zeros))
        f.write(comp.flush())
    return sop


def build_corpus(out: Path, flips: int, bomb_mb: int, max_files: int = 0) -> list[tuple[str, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, Path]] = []
    for src in bundled_test_files():
        try:
            ds = pydicom.dcmread(src)
        except Exception:  # noqa: BLE001
            continue
        if "PixelData" not in ds or "Rows" not in ds:
            continue
        try:
            retag(ds)
            base = out / f"{src.stem}.dcm"
            _save(ds, base)
        except Exception:  # noqa: BLE001
            continue
        files.append(("original", base))
        files.extend(mutations(base, out, flips))
    bomb = out / "deflate-bomb.dcm"
    write_deflate_bomb(bomb, bomb_mb)
    files.append((f"deflate bomb {bomb_mb} MiB", bomb))
    return files[:max_files] if max_files else files


# --------------------------------------------------------------------------- node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeProcess:
    """`screener serve` in a subprocess; peak memory sampled from /proc (node + children)."""

    def __init__(self, work: Path, engines: Path, port: int) -> None:
        self.work, self.port = work, port
        self.config = work / "node.toml"
        self.config.write_text(
            '[logging]\nlevel = "warning"\nrenderer = "json"\n'
            f'[node]\nport = {port}\nhost = "127.0.0.1"\nvar_dir = "{work / "var"}"\nmin_free_mb = 1\n'
            "[schedule]\nstudy_stable_s = 1.0\nbatch_interval_s = 0.5\n"
            f'[engines]\ndir = "{engines}"\nbackend = "onnx-fp32"\nenabled = ["spondylosis"]\n'
        )  # no [[routing]]: the built-in rules for the enabled engines
        self.proc: subprocess.Popen | None = None
        self.peak_rss = 0
        self.starts = 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self.log = open(work / "node.log", "ab")  # noqa: SIM115

    def start(self) -> None:
        root = str(Path(__file__).resolve().parents[1])  # this checkout's screener, not an installed one
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "screener.cli", "serve", "--config", str(self.config)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.starts += 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited at start (rc {self.proc.returncode}); see {self.work / 'node.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.3)
        else:
            raise RuntimeError("node did not start listening")
        if self._sampler is None:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _tree_rss(self) -> int:
        if self.proc is None:
            return 0
        pids = [self.proc.pid]
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            pids += [int(c) for c in children]
        except OSError:
            pass
        total = 0
        for pid in pids:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:") and pid == self.proc.pid:
                        self.peak_rss = max(self.peak_rss, int(line.split()[1]) * 1024)
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                continue
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self._tree_rss())
            time.sleep(0.1)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self._tree_rss()
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    def close(self) -> None:
        self._stop.set()
        self.stop()
        self.log.close()


def instance_states(var: Path) -> dict[str, int]:
    db = var / "screener.db"
    if not db.is_file():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(con.execute("SELECT state, count(*) FROM instances GROUP BY state").fetchall())
    finally:
        con.close()


def _valid_uid(value: object) -> bool:
    text = str(value or "")
    return len(text) <= 64 and re.fullmatch(r"[0-9]+(\.[0-9]+)*", text) is not None


def _sendable_meta(path: Path) -> str | None:
    """The file's transfer syntax when its file meta names a DX instance with valid UIDs, else None
    (the file meta is not sent on the wire, but a sender needs it to know what to send)."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        ts, sop, cls = (
            meta.get("TransferSyntaxUID"),
            meta.get("MediaStorageSOPInstanceUID"),
            meta.get("MediaStorageSOPClassUID"),
        )
    except Exception:  # noqa: BLE001
        return None
    if str(cls) != DX or not _valid_uid(sop) or not _valid_uid(ts):
        return None
    return str(ts)


def send_all(
    files: list[tuple[str, Path]], node: NodeProcess, batch: int = 50
) -> tuple[collections.Counter, dict[str, collections.Counter], int]:
    """Send every file raw; returns (status counts, status counts per kind, node crashes seen while sending)."""
    from pynetdicom import AE, _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    statuses: collections.Counter = collections.Counter()
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    crashes = 0
    todo = list(files)
    while todo:
        chunk, todo = todo[:batch], todo[batch:]
        ae = AE(ae_title="HOSTILE")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        syntaxes = set()
        sendable = {}
        for _, p in chunk:
            meta = _sendable_meta(p)
            if meta is not None:
                syntaxes.add(meta)
                sendable[p] = meta
        for ts in sorted(syntaxes):
            ae.add_requested_context(DX, ts)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CSPINE")
        for kind, p in chunk:
            if p not in sendable:
                status = "not sent (file meta corrupt: a sender cannot tell its SOP instance or syntax)"
            elif not assoc.is_established:
                status = "no association"
            else:
                try:
                    rsp = assoc.send_c_store(p)
                    code = int(rsp.Status) if "Status" in rsp else None
                    status = f"0x{code:04X}" if code is not None else "no response"
                except Exception as exc:  # noqa: BLE001 - an unreadable file on our side
                    status = f"not sent ({type(exc).__name__})"
            statuses[status] += 1
            by_kind[kind][status] += 1
        if assoc.is_established:
            assoc.release()
        if not node.alive():
            crashes += 1
            node.start()
    return statuses, by_kind, crashes


def demo_engine(work: Path) -> Path:
    from trainer.build import BuildOptions, build_engine
    from trainer.synth import synthesize

    data = work / "synth"
    synthesize(data, n=72, seed=7, healthy_fraction=0.3)
    build_engine(
        BuildOptions(
            task="spondylosis",
            data=data,
            out=work / "engines",
            image_size=64,
            epochs=1,
            batch_size=8,
            progress=False,
            n_boot=100,
            augment="light",
            demo=True,
        )
    )
    return work / "engines"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engines", type=Path, help="engines folder with spondylosis (default: build a small demo one)")
    ap.add_argument("--flips", type=int, default=2)
    ap.add_argument("--bomb-mb", type=int, default=1024)
    ap.add_argument("--max-files", type=int, default=0, help="send only the first N files (0: all)")
    ap.add_argument("--wait-s", type=float, default=300.0, help="longest wait for terminal states")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the node is stopped on the way out
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    files = build_corpus(work / "corpus", args.flips, args.bomb_mb, args.max_files)
    kinds = collections.Counter(k for k, _ in files)
    engines = args.engines or demo_engine(work)
    node = NodeProcess(work, engines, _free_port())
    node.start()
    try:
        statuses, by_kind, crashes = send_all(files, node)
        deadline = time.monotonic() + args.wait_s
        while time.monotonic() < deadline:
            if not node.alive():
                crashes += 1
                node.start()
            states = instance_states(work / "var")
            if sum(v for k, v in states.items() if k not in TERMINAL) == 0 and states:
                break
            time.sleep(1.0)
        # recovery: a restart must not crash either
        node.stop()
        node.start()
        time.sleep(5.0)
        if not node.alive():
            crashes += 1
        states = instance_states(work / "var")
    finally:
        node.close()
    result = {
        "files_sent": len(files),
        "kinds": dict(kinds),
        "statuses": dict(statuses),
        "statuses_by_kind": {k: dict(v) for k, v in by_kind.items()},
        "node_crashes": crashes,
        "node_starts": node.starts,
        "instances_by_state": states,
        "instances_not_terminal": sum(v for k, v in states.items() if k not in TERMINAL),
        "peak_memory_mb": round(node.peak_rss / 2**20, 1),
    }
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
