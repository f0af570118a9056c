"""The systemd unit carries the hardening deploy/ADMIN.md describes, and systemd accepts it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "cspine-screener.service"


def settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_hardening():
    s = settings()
    assert s["User"] == ["cspine"] and s["Group"] == ["cspine"]
    assert s["UMask"] == ["0077"]
    assert s["NoNewPrivileges"] == ["yes"] and s["CapabilityBoundingSet"] == [""]
    assert s["ProtectSystem"] == ["strict"] and any(p.endswith("/var") for p in s["ReadWritePaths"])
    assert s["PrivateTmp"] == ["yes"] and s["ProtectHome"] == ["yes"]
    assert s["MemoryMax"] and s["LimitCORE"] == ["0"]
    assert "AF_INET" in s["RestrictAddressFamilies"][0]
    assert s["RestartPreventExitStatus"] == ["2"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    # ExecStart must exist for verify: point it at a binary that does.
    text = UNIT.read_text()
    lines = [("ExecStart=/bin/true" if ln.startswith("ExecStart=") else ln) for ln in text.splitlines()]
    unit = tmp_path / "cspine-screener.service"
    unit.write_text("\n".join(lines) + "\n")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "cspine-screener.service" not in r.stderr, r.stderr
