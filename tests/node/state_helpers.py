"""Helpers for the state-machine fault tests: a node in a subprocess, a forgiving C-STORE sender,
and the end-to-end check of the promise (every acknowledged instance is in the last SR delivered
for its study, or failed/skipped with a reason)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE

from screener import config
from screener.dicom.sr import summarize
from screener.store import Store
from tests.support.dicom_factory import make_dx, make_study_ids
from tests.support.node_helpers import node_settings, synth_gray

REPO = Path(__file__).resolve().parents[2]
CRASH_EXIT = 86


def fast_settings(var: Path, engines_dir: Path, destinations, **schedule) -> config.Settings:
    """Settings with short deadlines for fault tests (the tiny session engine)."""
    base = {
        "study_stable_s": 0.2,
        "batch_interval_s": 0.05,
        "send_backoff_s": 0.2,
        "send_retries": 50,
        "screen_retry_s": 0.3,
        "retention_interval_s": 0.3,
        "stop_timeout_s": 20.0,
    }
    base.update(schedule)
    settings = node_settings(var, engines_dir, destinations, **base)
    enabled = set(settings.engines.enabled)  # config.parse (the subprocess) checks rules against engines
    return dataclasses.replace(settings, routing=[r for r in settings.routing if set(r.engines) <= enabled])


class NodeProcess:
    """`screener serve` (tests/node/node_runner.py) in a subprocess, on a free port."""

    def __init__(self, settings: config.Settings, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.workdir = workdir
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 60.0) -> NodeProcess:
        cfg = self.workdir / f"settings-{time.monotonic_ns()}.json"
        cfg.write_text(json.dumps(dataclasses.asdict(self.settings)))
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **self.env}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.node.node_runner", str(cfg)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._ready.is_set():
            if self.proc.poll() is not None and self._ready.wait(0.2) is False:
                return self  # died during start (a crash point in recovery): see exit_code
            self._ready.wait(0.05)
        if not self._ready.is_set():
            self.kill()
            raise AssertionError("node did not start:\n" + "\n".join(self.lines[-30:]))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "listening on port" in line:
                self.port = int(line.split("listening on port")[1].split(";")[0])
                self._ready.set()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            self.proc.wait(30)  # type: ignore[union-attr]

    def terminate(self, timeout: float = 60.0) -> int | None:
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        return self.wait(timeout)


def try_send(datasets, port: int | None, timeout: float = 10.0) -> list[int | None]:
    """C-STORE datasets in one association; the status of each, None where none came back."""
    out: list[int | None] = [None] * len(datasets)
    if port is None:
        return out
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="CSPINE")
    except Exception:  # noqa: BLE001
        return out
    if not assoc.is_established:
        return out
    try:
        for i, ds in enumerate(datasets):
            try:
                st = assoc.send_c_store(ds)
            except Exception:  # noqa: BLE001
                break
            if st and "Status" in st:
                out[i] = int(st.Status)
            if not assoc.is_established:
                break
    finally:
        try:
            assoc.release()
        except Exception:  # noqa: BLE001
            pass
    return out


@dataclass
class Modality:
    """Images to send, and which were acknowledged (0x0000) by the node."""

    images: dict[str, object] = field(default_factory=dict)  # sop -> dataset
    study_of: dict[str, str] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)

    def study(self, gray, n: int, view: str = "LL"):
        ids = make_study_ids()
        out = []
        for k in range(n):
            ds = make_dx(gray, ids, view, instance_number=k + 1)
            self.images[ds.SOPInstanceUID] = ds
            self.study_of[ds.SOPInstanceUID] = ids["StudyInstanceUID"]
            out.append(ds)
        return ids["StudyInstanceUID"], out

    def late(self, gray, study_uid: str, n: int = 1):
        out = []
        for k in range(n):
            ds = make_dx(gray, {"StudyInstanceUID": study_uid}, "LL", instance_number=100 + k, series_number=2)
            self.images[ds.SOPInstanceUID] = ds
            self.study_of[ds.SOPInstanceUID] = study_uid
            out.append(ds)
        return out

    def send(self, datasets, port) -> list[int | None]:
        statuses = try_send(datasets, port)
        for ds, st in zip(datasets, statuses):
            if st == 0:
                self.acked.add(ds.SOPInstanceUID)
        return statuses


def small_gray(data_dir: Path, index: int = 0):
    return synth_gray(data_dir, index, max_side=160)


def read_store(var: Path):
    """A read-only look at a node's database (no recovery)."""
    return Store.open(var, recover=False)


def quiescent(var: Path) -> bool:
    """Nothing left to do: every study sent, skipped or failed, no pending delivery."""
    with read_store(var) as s:
        c = s.counts()
    busy = sum(c["studies"][k] for k in ("receiving", "complete", "screening", "screened", "reported"))
    return busy == 0 and c["outbox"]["pending"] == 0


def wait_until(pred, timeout: float, interval: float = 0.05, alive=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if alive is not None and not alive():
            return False
        time.sleep(interval)
    return False


@dataclass
class Verdict:
    acknowledged: int
    srs_delivered: int
    missing: int
    duplicates: int
    stuck: int
    stale_last: int
    violations: list[str]
    details: list[str]

    def as_dict(self) -> dict[str, int]:
        return {
            "acknowledged": self.acknowledged,
            "srs_delivered": self.srs_delivered,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "stuck": self.stuck,
            "stale_last": self.stale_last,
            "invariant_violations": len(self.violations),
        }


def verdict(var: Path, modality: Modality, received: list) -> Verdict:
    """The promise, end to end: for each study, the last SR delivered is the study's current SR and
    references every acknowledged instance that is not failed/skipped with a reason."""
    uids = [str(ds.SOPInstanceUID) for ds in received]
    dup = sum(n - 1 for n in Counter(uids).values() if n > 1)
    last: dict[str, object] = {}
    for ds in received:
        last[str(ds.StudyInstanceUID)] = ds
    details: list[str] = []
    missing = stale = 0
    with read_store(var) as s:
        violations = s.check_invariants()
        c = s.counts()
        stuck = sum(c["studies"][k] for k in ("receiving", "complete", "screening", "screened", "reported"))
        stuck += c["outbox"]["pending"] + c["instances"]["received"] + c["instances"]["screened"]
        stuck += c["instances"]["reported"]
        by_study: dict[str, set[str]] = {}
        for sop in modality.acked:
            by_study.setdefault(modality.study_of[sop], set()).add(sop)
        for study_uid, sops in sorted(by_study.items()):
            expected = set()
            for sop in sops:
                row = s.get_instance(sop)
                if row is None:
                    details.append(f"acknowledged instance {sop} is not in the database")
                    missing += 1
                elif row.state in ("failed", "skipped"):
                    if not row.reason:
                        details.append(f"{sop} {row.state} without a reason")
                        missing += 1
                else:
                    expected.add(sop)
            if not expected:
                continue
            sr = last.get(study_uid)
            if sr is None:
                details.append(f"study {study_uid}: no SR delivered")
                missing += len(expected)
                continue
            sources = {r["source_sop_instance_uid"] for r in summarize(sr)}
            lost = expected - sources
            if lost:
                details.append(f"study {study_uid}: {len(lost)} instance(s) missing from the last SR delivered")
                missing += len(lost)
            st = s.get_study(study_uid)
            if st is None or st.sr_sop_instance_uid != str(sr.SOPInstanceUID):
                details.append(f"study {study_uid}: the last SR delivered is not the current one")
                stale += 1
    return Verdict(len(modality.acked), len(received), missing, dup, stuck, stale, violations, details)


def record_stats(name: str, stats: dict) -> None:
    """Append figures to $SCREENER_STATS_FILE (JSON lines) when set, for the closing note."""
    path = os.environ.get("SCREENER_STATS_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": name, **stats}) + "\n")
