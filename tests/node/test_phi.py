"""No patient data where it does not belong, and patient data at rest private.

Studies with distinctive patient values (name, ID, birth date, a malformed birth date, accession)
go through a real `screener serve` process (started with umask 022, once with each log renderer)
and through `screener replay`. Every line the node and replay write to stderr/stdout, every reason
in the database, `screener status` output and every audit file (but the SR copies, which carry
patient data by design) is searched for those values; the modes of everything under var/ and the
audit folder are checked (folders 0700, files 0600, the SQLite database and its WAL/SHM included).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from screener.store import Store
from tests.support.dicom_factory import make_dx, make_study_ids
from tests.support.node_helpers import CollectingSCP, send_images, synth_gray

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NAME = "Zyxwvut^Qsrpon"
PATIENT_ID = "PIDQ98765X"
BIRTH_DATE = "19230405"
BAD_BIRTH_DATE = "1923-04-05X"
ACCESSION = "ACCZ55501"
# What must never appear: each value and its recognisable parts.
NEEDLES = ("Zyxwvut", "Qsrpon", PATIENT_ID, "98765X", BIRTH_DATE, "1923-04-05", ACCESSION, "Z55501")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def studies(data_dir: Path) -> list:
    """A normal study, one with a malformed birth date, one with an image whose pixel data is cut
    short (a failure with a reason) and one that no routing rule matches (skipped)."""
    out = []
    for i, birth in enumerate((BIRTH_DATE, BAD_BIRTH_DATE, BIRTH_DATE, BIRTH_DATE)):
        ids = make_study_ids()
        ids["AccessionNumber"] = ACCESSION
        ds = make_dx(synth_gray(data_dir, i, 256), ids, "AP" if i == 3 else "LL")
        ds.PatientName = NAME
        ds.PatientID = PATIENT_ID
        ds.OtherPatientIDs = PATIENT_ID
        ds.PatientBirthDate = birth
        ds.InstitutionName = f"Clinic of {NAME}"
        ds.StudyDescription = f"C-SPINE {ACCESSION}"
        if i == 2:
            ds.PixelData = ds.PixelData[:100]
        out.append(ds)
    return out


def write_config(path: Path, *, port: int, var: Path, engines: Path, scp: CollectingSCP, renderer: str) -> Path:
    path.write_text(
        f'[logging]\nrenderer = "{renderer}"\nlevel = "debug"\n'
        f'[node]\nhost = "127.0.0.1"\nport = {port}\nvar_dir = "{var}"\nmin_free_mb = 1\n'
        "[schedule]\nstudy_stable_s = 0.5\nbatch_interval_s = 0.2\nsend_backoff_s = 0.2\n"
        f'[engines]\ndir = "{engines}"\nbackend = "onnx-fp32"\nenabled = ["spondylosis"]\n'
        f'[[destinations]]\nae_title = "{scp.ae_title}"\nhost = "127.0.0.1"\nport = {scp.port}\n'
        '[[routing]]\nname = "lateral"\nengines = ["spondylosis"]\nmodality = ["CR", "DX"]\n'
        'view_position = ["LL", "RL", "LATERAL", "LAT"]\n'
    )
    return path


def screener(*args: str, umask: int = 0o022, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}
    return subprocess.Popen(
        [sys.executable, "-m", "screener.cli", *args],
        cwd=ROOT,
        env=env,
        preexec_fn=lambda: os.umask(umask),
        **kw,
    )


def leaks(text: str) -> list[str]:
    return [n for n in NEEDLES if n in text]


def bad_modes(root: Path) -> list[str]:
    wrong = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode)}")
    return wrong


def _wait_settled(var: Path, timeout: float = 120) -> dict:
    """Poll the database until no study is still on its way (no timing asserted)."""
    deadline = time.monotonic() + timeout
    counts: dict = {}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if not (var / "screener.db").is_file():
            continue
        store = Store.open(var, recover=False)
        try:
            counts = store.counts()
        finally:
            store.close()
        studies = counts.get("studies", {})
        busy = sum(v for k, v in studies.items() if k in ("receiving", "complete", "screening", "screened", "reported"))
        outbox = counts.get("outbox", {})
        if studies and not busy and not outbox.get("pending"):
            return counts
    raise AssertionError(f"node did not settle: {counts}")


@pytest.mark.parametrize("renderer", ["console", "json"])
def test_no_patient_data_in_logs_reasons_status_audit_and_private_files(tmp_path, built, renderer):
    data, engines = built[0].data, built[1].parent
    datasets = studies(data)
    scp = CollectingSCP().start()
    port = _free_port()
    var = tmp_path / "var"
    cfg = write_config(tmp_path / "c.toml", port=port, var=var, engines=engines, scp=scp, renderer=renderer)
    stderr_path = tmp_path / "serve.err"
    try:
        with open(stderr_path, "wb") as err:
            node = screener("serve", "--config", str(cfg), stdout=err, stderr=subprocess.STDOUT)
            try:
                deadline = time.monotonic() + 120
                while True:
                    assert node.poll() is None, stderr_path.read_text()
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        assert time.monotonic() < deadline, stderr_path.read_text()
                        time.sleep(0.2)
                statuses = [s for ds in datasets for s in send_images([ds], port)]
                assert statuses == [0, 0, 0, 0]
                counts = _wait_settled(var)
                scp.wait_for(1, timeout=60)
            finally:
                node.send_signal(signal.SIGTERM)
                node.wait(timeout=120)
    finally:
        scp.stop()
    log_text = stderr_path.read_text(errors="replace")
    assert node.returncode == 0, log_text[-3000:]
    assert "Traceback" not in log_text
    assert leaks(log_text) == [], log_text

    # Reasons in the database (every state change is an event row with its reason), and the raw
    # database files themselves: UIDs and reasons only.
    store = Store.open(var, recover=False)
    try:
        reasons = [f.reason for f in store.failures(100)]
        assert any(r for r in reasons), (counts, reasons)
    finally:
        store.close()
    assert leaks("\n".join(reasons)) == [], reasons
    # The malformed birth date is left out of the SR's copy of the patient module (the study is
    # reported, see sr._copyable_header), so it is no failure reason either.
    assert not any("invalid DA value" in r for r in reasons), reasons
    for db_file in var.glob("screener.db*"):
        raw = db_file.read_bytes().decode("latin-1")
        assert leaks(raw) == [], db_file.name

    status = subprocess.run(
        [sys.executable, "-m", "screener.cli", "status", "--config", str(cfg)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    assert "failures:" in status.stdout
    assert leaks(status.stdout + status.stderr) == [], status.stdout

    # Replay of the same files (umask 022 again), audit folder included.
    folder = tmp_path / "archive"
    folder.mkdir()
    for i, ds in enumerate(datasets):
        ds.save_as(folder / f"img{i}.dcm", enforce_file_format=True)
    audit = tmp_path / "audit"
    replay = screener(
        "replay", str(folder), "--out", str(audit), "--config", str(cfg), "--quiet",
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = replay.communicate(timeout=300)
    replay_text = out.decode(errors="replace")
    assert replay.returncode == 0, replay_text
    assert "Traceback" not in replay_text
    assert leaks(replay_text) == [], replay_text
    for f in audit.rglob("*"):
        if f.is_file() and f.parent.name != "sr":  # the audit's SR copies carry patient data by design
            assert leaks(f.read_text(errors="replace")) == [], f.name

    # At rest: private whatever the umask.
    assert bad_modes(var) == []
    assert {p.name for p in var.glob("screener.db*")} >= {"screener.db"}
    assert bad_modes(audit) == []


def test_existing_var_tree_is_made_private(tmp_path):
    from screener.privacy import make_tree_private

    var = tmp_path / "var"
    (var / "spool" / "1.2.3").mkdir(parents=True)
    for p in (var, var / "spool", var / "spool" / "1.2.3"):
        p.chmod(0o755)
    for name in ("screener.db", "screener.db-wal", "screener.db-shm", "spool/1.2.3/4.dcm"):
        (var / name).write_bytes(b"x")
        (var / name).chmod(0o644)
    assert make_tree_private(var) == 7
    assert bad_modes(var) == []


@pytest.mark.parametrize("renderer", ["console", "json"])
def test_safe_reason_and_scrubbed_library_output(renderer):
    import io
    import logging
    import warnings

    from screener import logs
    from screener.errors import safe_reason

    exc = ValueError(f"Unable to convert '{BAD_BIRTH_DATE}' to 'DA'")
    reason = safe_reason(exc, "SR not built", "PatientBirthDate")
    assert reason == "SR not built: ValueError (PatientBirthDate, invalid DA value)"
    buf = io.StringIO()
    try:
        logs.configure(renderer, "debug", stream=buf)
        warnings.warn(f"Invalid value for VR PN: '{NAME}'", UserWarning, stacklevel=1)
        warnings.warn(f"Invalid value for VR DA: {BAD_BIRTH_DATE}", UserWarning, stacklevel=1)
        logging.getLogger("highdicom.sr").warning("Patient name %s is odd", NAME)
        try:
            raise ValueError(f"Unable to convert '{BAD_BIRTH_DATE}' to 'DA' for {PATIENT_ID}")
        except ValueError:
            logs.get_logger("t").exception("job_failed", study_uid="1.2.3")
    finally:
        logs.configure("console", "info")
    text = buf.getvalue()
    assert leaks(text) == [], text
    assert "Traceback" not in text
    assert "library_warning" in text and "Invalid value for VR PN" in text
    assert "library_log" in text and "highdicom.sr" in text
    assert "job_failed" in text and "ValueError" in text and "invalid DA value" in text
