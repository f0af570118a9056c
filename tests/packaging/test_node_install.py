"""A node-only install (`pip install .`, no extras) runs the node without PyTorch.

One fresh virtual environment for the module: the project installed from a copy of this
checkout with no extras. In it, `import torch` fails, `screener replay` screens a folder of
synthetic DX files with the session's ONNX spondylosis engine, `screener serve` answers a
C-ECHO and stops cleanly on SIGTERM, and `trainer` names the extra to install. Slow: the
install resolves every node dependency (about 1-2 minutes with a local wheel mirror).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from tests.support.dicom_factory import make_dx, make_study_ids
from tests.support.node_helpers import synth_gray

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# What a source copy needs; everything else (venvs, engines, state, caches, VCS) stays behind.
_LEFT_OUT = shutil.ignore_patterns(
    ".git", ".venv", "var", "engines", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
)


def _env() -> dict[str, str]:
    """The environment of a user's shell: nothing of this test run's import path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def node_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv with `pip install <copy of this checkout>` (no extras)."""
    base = tmp_path_factory.mktemp("node-install")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_LEFT_OUT)
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    bin_dir = env_dir / "bin"
    t0 = time.monotonic()
    res = _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(src)], cwd=base, timeout=900)
    if res.returncode != 0:
        tail = (res.stderr or res.stdout)[-2000:]
        if "No matching distribution" in tail or "Could not find a version" in tail:
            pytest.skip(f"no package index reachable for a fresh install: {tail.splitlines()[-1]}")
        pytest.fail(f"pip install . failed:\n{tail}")
    print(f"node-only install: {time.monotonic() - t0:.0f} s")
    return bin_dir


def test_no_torch_and_no_trainer_dependencies(node_venv: Path, tmp_path: Path) -> None:
    res = _run([str(node_venv / "python"), "-c", "import torch"], cwd=tmp_path)
    assert res.returncode != 0 and "No module named 'torch'" in res.stderr
    for absent in ("torchvision", "onnx", "openpyxl", "matplotlib"):
        res = _run([str(node_venv / "python"), "-c", f"import {absent}"], cwd=tmp_path)
        assert res.returncode != 0, f"{absent} is installed by the node-only install"
    res = _run([str(node_venv / "python"), "-c", "import screener.cli, screener.node, screener.replay"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def test_trainer_names_the_extra(node_venv: Path, tmp_path: Path) -> None:
    res = _run([str(node_venv / "trainer"), "--help"], cwd=tmp_path)
    assert res.returncode == 2
    assert "pip install 'cspine-screener[trainer]'" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def _config(tmp_path: Path, engines: Path, port: int = 11112) -> Path:
    cfg = tmp_path / "node.toml"  # no [[routing]]: the built-in rules for the enabled engine
    cfg.write_text(
        f'[logging]\nlevel = "warning"\n'
        f'[node]\nhost = "127.0.0.1"\nport = {port}\nvar_dir = "{tmp_path / "var"}"\nmin_free_mb = 1\n'
        f'[engines]\ndir = "{engines}"\nbackend = "onnx-fp32"\nenabled = ["spondylosis"]\n'
        "[http]\nenabled = false\n"
    )
    return cfg


def test_replay_screens_with_onnx_engines(node_venv: Path, built, tmp_path: Path) -> None:
    opts, engine = built
    archive = tmp_path / "archive"
    archive.mkdir()
    study = make_study_ids()
    for i in range(3):
        make_dx(synth_gray(opts.data, i, 384), study, "LL", instance_number=i + 1).save_as(
            archive / f"img{i}.dcm", enforce_file_format=True
        )
    (archive / "notes.txt").write_text("not dicom")
    out = tmp_path / "out"
    cfg = _config(tmp_path, engine.parent)
    res = _run(
        [str(node_venv / "screener"), "replay", str(archive), "--out", str(out), "--config", str(cfg), "--quiet"],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {r["file"]: r for r in json.loads((out / "audit.json").read_text())}
    for i in range(3):
        row = rows[f"img{i}.dcm"]
        assert row["engine"] == "spondylosis" and 0.0 <= row["probability"] <= 1.0
    assert rows["notes.txt"]["status"] == "failed"
    assert len(list((out / "sr").glob("*.dcm"))) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_answers_echo_and_stops_on_sigterm(node_venv: Path, built, tmp_path: Path) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    port = _free_port()
    cfg = _config(tmp_path, built[1].parent, port)
    proc = subprocess.Popen(
        [str(node_venv / "screener"), "serve", "--config", str(cfg)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            ae = AE(ae_title="PACKTEST")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", port, ae_title="CSPINE")
            if assoc.is_established:
                status = assoc.send_c_echo()
                assoc.release()
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate(timeout=10)[1][-2000:]
        assert status is not None and status.Status == 0x0000
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err


def test_node_install_is_small(node_venv: Path, record_property: pytest.RecordProperty) -> None:
    """No assertion on a size: the figure goes to the test report (README: node-only install size)."""
    env_dir = node_venv.parent
    size = sum(p.stat().st_size for p in env_dir.rglob("*") if p.is_file() and not p.is_symlink())
    record_property("node_venv_bytes", size)
    print(f"node-only venv: {size / 2**20:.0f} MiB ({sys.version_info.major}.{sys.version_info.minor})")
