"""`screener replay FOLDER`: the node's path (routing, decoding, preprocessing, engines, SR)
over every file under a folder, offline, for audits.

Outputs in ``--out`` (default ``FOLDER-audit``):

- ``audit.csv`` / ``audit.json``: per image and engine the file, Study and SOP Instance UID,
  engine name, version and backend, probability, finding, threshold and time taken; per
  skipped or failed file the reason.
- ``sr/<StudyInstanceUID>.dcm``: one SR per study, as the node would send it. SR UIDs are
  derived from the source instances and engine versions, so two replays of the same folder
  with the same engines give the same SR content (timestamps aside).
- ``summary.json``: counts, engines with their manifests' versions and file hashes, the
  software version and timings.
- ``audit.jsonl``: the progress log. A re-run skips files already in it (resume).

Files go through the Screener's worker pool (``screener.pipeline``): decoding and
preprocessing of the next chunks run in isolated worker processes while the engines work
on this one; a file that crashes or overruns a worker is listed as failed with a reason and
the replay goes on. SRs are built in the same pool, one study per task. Replay always
finishes: ``summary.json`` lists every failed file with its reason (``failed_files``) and every
study whose SR could not be built (``failed_srs``).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from screener import __version__
from screener.engine.runtime import LoadedEngine
from screener.errors import safe_reason
from screener.logs import get_logger
from screener.pipeline.pool import Failure
from screener.privacy import make_tree_private
from screener.screening import ImageOutcome, Screener
from screener.store.files import make_private_dir

log = get_logger(__name__)

AUDIT_FIELDS = [
    "file",
    "study_uid",
    "sop_instance_uid",
    "engine",
    "engine_version",
    "backend",
    "probability",
    "finding",
    "threshold",
    "seconds",
    "status",
    "reason",
    "laterality",
    "roi",
]


@dataclass(frozen=True)
class ReplaySummary:
    out: Path
    files: int
    screened: int
    skipped: int
    failed: int
    results: int
    studies: int
    srs: int
    seconds: float
    images_per_s: float


def list_files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, sorted (hidden files and folders skipped)."""
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root) / n for n in sorted(names) if not n.startswith("."))
    return files


def _key(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def outcome_rows(out: ImageOutcome, folder: Path) -> list[dict[str, Any]]:
    base = {"file": _key(out.path, folder), "study_uid": out.study_uid, "sop_instance_uid": out.sop_instance_uid}
    if not out.results:
        return [{**base, "status": out.state, "reason": out.failed or out.skipped or "no engine result"}]
    lat = out.route.laterality if out.route else ""
    return [
        {
            **base,
            "engine": r.engine,
            "engine_version": r.version,
            "backend": r.backend,
            "probability": r.probability,
            "finding": "present" if r.present else "absent",
            "threshold": r.threshold,
            "seconds": round(r.seconds + out.decode_seconds, 6),
            "status": out.state,
            "reason": out.failed,
            "laterality": lat if r.roi else "",
            "roi": list(r.roi) if r.roi else None,
        }
        for r in out.results
    ]


def _load_progress(path: Path) -> dict[str, list[dict[str, Any]]]:
    done: dict[str, list[dict[str, Any]]] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that file is simply screened again
            done.setdefault(row["file"], []).append(row)
    return done


def engines_summary(engines: Mapping[str, LoadedEngine]) -> dict[str, Any]:
    return {
        name: {
            "version": e.manifest.version,
            "backend": e.backend.name,
            "backend_sha256": e.backend.sha256,
            "threshold": e.manifest.threshold.value if e.manifest.threshold else None,
            "validated": e.manifest.validated,
            "demo": e.manifest.demo,
            "data_fingerprint": e.manifest.data.get("fingerprint"),
            "files": {b.name: b.sha256 for b in e.manifest.backends},
        }
        for name, e in engines.items()
    }


def replay(
    folder: Path,
    out: Path,
    screener: Screener,
    engines: Mapping[str, LoadedEngine],
    chunk: int = 32,
    progress: bool = True,
    write_sr: bool = True,
) -> ReplaySummary:
    folder, out = Path(folder), Path(out)
    make_private_dir(out)  # the audit holds patient data (SR copies): 0700 / 0600 whatever the umask
    make_tree_private(out)
    progress_file = out / "audit.jsonl"
    done = _load_progress(progress_file)
    files = list_files(folder)
    todo = [p for p in files if _key(p, folder) not in done]
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=len(files), initial=len(files) - len(todo), unit="img", desc="replay", disable=not progress)
    error = ""
    with open(progress_file, "a", encoding="utf-8") as log_f:
        try:
            for outcomes in screener.stream(todo, chunk):
                for outcome in outcomes:
                    rows = outcome_rows(outcome, folder)
                    done[rows[0]["file"]] = rows
                    for row in rows:
                        log_f.write(json.dumps(row, sort_keys=True) + "\n")
                log_f.flush()
                os.fsync(log_f.fileno())
                bar.update(len(outcomes))
        except Exception as exc:  # noqa: BLE001 - an engine or disk error: keep what was done, say why
            error = f"replay stopped early: {exc.__class__.__name__}"
            log.error("replay_stopped", reason=error)
    bar.close()
    elapsed = time.perf_counter() - t0
    rows = [r for f in sorted(done) for r in done[f] if (folder / f).exists()]
    write_audit(out, rows)
    try:
        sr_failures: list[dict[str, str]] = []
        n_srs, n_studies = write_srs(out, folder, rows, engines, screener, sr_failures) if write_sr else (0, 0)
    finally:
        screener.close()
    by_file: dict[str, str] = {r["file"]: r["status"] for r in rows}
    summary = ReplaySummary(
        out,
        len(by_file),
        sum(s == "screened" for s in by_file.values()),
        sum(s == "skipped" for s in by_file.values()),
        sum(s == "failed" for s in by_file.values()),
        sum(1 for r in rows if r.get("engine")),
        n_studies,
        n_srs,
        round(elapsed, 3),
        round(len(todo) / elapsed, 3) if elapsed > 0 and todo else 0.0,
    )
    (out / "summary.json").write_text(
        json.dumps(
            {
                "software_version": __version__,
                "folder": str(folder),
                "files_this_run": len(todo),
                "counts": {k: v for k, v in summary.__dict__.items() if k not in ("out",)},
                "engines": engines_summary(engines),
                "failed_files": [
                    {"file": r["file"], "reason": r.get("reason", "")} for r in rows if r.get("status") == "failed"
                ],
                "failed_srs": sr_failures,
                "error": error,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    make_tree_private(out)
    log.info(
        "replay_done",
        files=summary.files,
        screened=summary.screened,
        skipped=summary.skipped,
        failed=summary.failed,
        srs=summary.srs,
    )
    return summary


def write_audit(out: Path, rows: list[dict[str, Any]]) -> None:
    (out / "audit.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    with open(out / "audit.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=AUDIT_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "roi": " ".join(f"{v:.1f}" for v in r["roi"]) if r.get("roi") else ""})


@dataclass(frozen=True)
class SRTask:
    """One study's SR, built in a worker: its audit rows and the engines' manifests."""

    out: str
    folder: str
    study_uid: str
    rows: tuple[dict[str, Any], ...]
    manifests: dict[str, Any]


def build_study_sr(task: SRTask) -> str:
    """Build and write one study's SR; returns "" when written, else why not (our words)."""
    from screener.dicom.sr import EngineInfo, Finding, build_sr, derive_uid, sr_to_bytes

    findings = []
    for r in sorted(task.rows, key=lambda r: (r["sop_instance_uid"], r["engine"])):
        if r["engine"] not in task.manifests:
            continue
        try:
            header = pydicom.dcmread(str(Path(task.folder) / r["file"]), stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - the file changed or vanished since screening
            return f"source header unreadable ({exc.__class__.__name__})"
        info = EngineInfo.from_manifest(task.manifests[r["engine"]], r["backend"])
        roi = tuple(r["roi"]) if r.get("roi") else None
        findings.append(
            Finding(
                header, info, float(r["probability"]), r["finding"] == "present", roi=roi,
                laterality=r.get("laterality") or None,
            )
        )  # fmt: skip
    if not findings:
        return "no findings"
    try:
        sr = build_sr(findings, software_version=__version__, device_uid=derive_uid("cspine-screener replay"))
        data = sr_to_bytes(sr)
    except Exception as exc:  # noqa: BLE001 - any header the SR cannot carry: this study only
        return safe_reason(exc, "SR not built")
    (Path(task.out) / "sr" / f"{task.study_uid}.dcm").write_bytes(data)
    return ""


def write_srs(
    out: Path,
    folder: Path,
    rows: Iterable[dict[str, Any]],
    engines: Mapping[str, LoadedEngine],
    screener: Screener | None = None,
    failures: list[dict[str, str]] | None = None,
) -> tuple[int, int]:
    """One SR per study from the audit rows (headers re-read without pixel data); in the
    screener's worker pool when given (parallel, isolated), else in this process."""
    by_study: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("engine") and r.get("study_uid"):
            by_study.setdefault(r["study_uid"], []).append(r)
    (out / "sr").mkdir(exist_ok=True)
    manifests = {name: e.manifest for name, e in engines.items()}
    tasks = [SRTask(str(out), str(folder), uid, tuple(items), manifests) for uid, items in sorted(by_study.items())]
    if screener is None or screener.serial or len(tasks) < 2:
        answers = [build_study_sr(t) for t in tasks]
    else:
        answers = [""] * len(tasks)
        for i, res in screener.pool.map(build_study_sr, tasks):
            answers[i] = res.reason if isinstance(res, Failure) else res
    written = 0
    for t, why in zip(tasks, answers):
        if why == "no findings":
            continue
        if why:
            log.warning("sr_not_built", study_uid=t.study_uid, reason=why)
            if failures is not None:
                failures.append({"study_uid": t.study_uid, "reason": why})
        else:
            written += 1
    return written, len(by_study)


# ----------------------------------------------------------------------------- compare


def compare(old_audit: Path, new_rows: list[dict[str, Any]], drift_tolerance: float = 1e-6) -> dict[str, Any]:
    """What changed between an earlier audit (audit.json or its folder) and this one."""
    path = Path(old_audit)
    if path.is_dir():
        path = path / "audit.json"
    old_rows = json.loads(path.read_text(encoding="utf-8"))

    def index(rows):
        return {(r["sop_instance_uid"] or r["file"], r.get("engine") or ""): r for r in rows}

    old, new = index(old_rows), index(new_rows)
    flipped, drifts = [], []
    for key in sorted(old.keys() & new.keys()):
        a, b = old[key], new[key]
        if not key[1]:
            continue
        if a.get("finding") != b.get("finding"):
            flipped.append(
                {
                    "sop_instance_uid": key[0],
                    "engine": key[1],
                    "old": a.get("finding"),
                    "new": b.get("finding"),
                    "old_probability": a.get("probability"),
                    "new_probability": b.get("probability"),
                }
            )
        if a.get("probability") is not None and b.get("probability") is not None:
            drifts.append(abs(float(a["probability"]) - float(b["probability"])))
    versions = sorted(
        {(r.get("engine"), r.get("engine_version")) for r in old_rows if r.get("engine")}
        ^ {(r.get("engine"), r.get("engine_version")) for r in new_rows if r.get("engine")}
    )
    return {
        "compared": len(drifts),
        "findings_flipped": flipped,
        "max_probability_drift": max(drifts) if drifts else 0.0,
        "mean_probability_drift": sum(drifts) / len(drifts) if drifts else 0.0,
        "drifted_over_tolerance": sum(d > drift_tolerance for d in drifts),
        "only_in_old": [list(k) for k in sorted(old.keys() - new.keys())],
        "only_in_new": [list(k) for k in sorted(new.keys() - old.keys())],
        "engine_versions_changed": [list(v) for v in versions],
    }


# ----------------------------------------------------------------------------- labels


def read_labels(path: Path) -> dict[str, dict[str, int]]:
    """labels CSV: a `sop_instance_uid` or `file` column, then one 0/1 column per engine name."""
    from screener.errors import UserError

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            key = "sop_instance_uid" if "sop_instance_uid" in fields else "file" if "file" in fields else None
            if key is None:
                raise UserError(f"{path}: needs a 'sop_instance_uid' or 'file' column (has: {', '.join(fields)})")
            out: dict[str, dict[str, int]] = {}
            for n, row in enumerate(reader, start=2):
                labels = {}
                for col, val in row.items():
                    if col == key or col is None or val is None or val.strip() == "":
                        continue
                    if val.strip() not in ("0", "1"):
                        raise UserError(f"{path}:{n}: label {col}={val!r} must be 0 or 1")
                    labels[col] = int(val)
                out[row[key].strip()] = labels
            return out
    except OSError as exc:
        raise UserError(f"{path}: cannot read labels ({exc.strerror})") from None


def labels_report(
    out: Path, rows: list[dict[str, Any]], labels: Mapping[str, Mapping[str, int]], engines: Mapping[str, LoadedEngine]
) -> dict[str, Path]:
    """The trainer's evaluation report per engine, at the engine's own threshold."""
    import dataclasses

    import numpy as np

    from screener.engine import metrics, report  # same distribution; the evaluation code lives with the trainer

    written: dict[str, Path] = {}
    for name, engine in engines.items():
        ys, ps = [], []
        for r in rows:
            if r.get("engine") != name:
                continue
            lab = labels.get(r["sop_instance_uid"]) or labels.get(r["file"])
            if lab is not None and name in lab:
                ys.append(lab[name])
                ps.append(float(r["probability"]))
        if not ys:
            continue
        y, p = np.array(ys), np.array(ps)
        thr = engine.manifest.threshold.value if engine.manifest.threshold else 0.5
        if len(set(ys)) < 2:
            log.warning("labels_one_class", engine=name, n=len(ys))
        ev = metrics.evaluate(y, p, y, p, class_names=tuple(engine.manifest.class_names))
        ev = dataclasses.replace(
            ev,
            threshold=dataclasses.replace(
                ev.threshold,
                threshold=thr,
                split="engine manifest",
                method="the engine's threshold (chosen on its validation split)",
            ),
            test=metrics.binary_metrics(y, p, thr),
            validation=metrics.binary_metrics(y, p, thr),
        )
        folder = out / "labels" / name
        paths = report.write_report(
            folder,
            ev,
            extra={"engine_version": engine.manifest.version, "backend": engine.backend.name, "n_labelled": len(ys)},
            y_test=y,
            p_test=p,
            title=f"Replay audit of {name} {engine.manifest.version} against site labels",
        )
        written[name] = paths["markdown"]
    return written
