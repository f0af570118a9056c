"""Disk full: the var folder on a small tmpfs (the tests run as root; skipped where mount is not
allowed). While it is full the node answers 0xA700, strands no study (a study whose SR cannot be
written goes back to `complete`, without using up its screening attempts), does not re-send, and
once space returns it finishes everything without a restart."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from screener.node import Node
from tests.node.state_helpers import Modality, fast_settings, record_stats, small_gray, verdict, wait_until
from tests.support.node_helpers import CollectingSCP


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> Path:
    """Fill the file system holding `path` up to the last block."""
    ballast = path / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            chunk = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk)
    finally:
        os.close(fd)
    return ballast


@pytest.mark.slow
def test_disk_full_then_space_returns(small_fs, built):
    engines_dir = built[1].parent
    gray = small_gray(built[0].data)
    scp = CollectingSCP().start()
    var = small_fs / "var"
    node = Node(fast_settings(var, engines_dir, [scp.destination], screen_retry_s=0.3))
    node.start()
    mod = Modality()
    try:
        study_a, imgs_a = mod.study(gray, 2)
        assert mod.send(imgs_a, node.port) == [0, 0]
        scp.wait_for(1, 60)

        # Study B is acknowledged, then the disk fills before its SR is written.
        study_b, imgs_b = mod.study(gray, 2)
        assert mod.send(imgs_b, node.port) == [0, 0]
        ballast = fill(small_fs)
        study_c, imgs_c = mod.study(gray, 1)
        assert mod.send(imgs_c, node.port) == [0xA700]  # out of resources: the modality keeps it

        # While full: nothing is delivered twice, B is not lost, the node keeps answering (0xA700).
        wait_until(lambda: False, 2.0)
        assert mod.send(imgs_c, node.port) == [0xA700]
        b = node.store.get_study(study_b)
        assert b is not None and b.screen_attempts <= 1  # a full disk does not use up attempts
        delivered_while_full = len(scp.received)

        # Space returns: without a restart, everything finishes.
        ballast.unlink()
        assert mod.send(imgs_c, node.port) == [0]
        assert wait_until(lambda: node.store.get_study(study_c) is not None, 10)

        def done() -> bool:
            c = node.store.counts()
            busy = sum(c["studies"][k] for k in ("receiving", "complete", "screening", "reported"))
            return busy == 0 and c["outbox"]["pending"] == 0

        assert wait_until(done, 90), node.store.counts()
    finally:
        node.stop()
        scp.stop()
    v = verdict(var, mod, scp.received)
    record_stats("disk_full", {**v.as_dict(), "delivered_while_full": delivered_while_full})
    assert v.violations == [] and v.details == []
    assert (v.missing, v.stuck, v.stale_last) == (0, 0, 0)
    counts = Counter(str(ds.SOPInstanceUID) for ds in scp.received)
    assert max(counts.values()) == 1  # no SR delivered twice: no re-send storm
    assert {str(ds.StudyInstanceUID) for ds in scp.received} == {study_a, study_b, study_c}


class OneShotSender:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path, destination, calling_aet, timeout_s=30.0, **_kw):
        self.calls += 1
        return True, ""


def test_no_resend_storm_when_recording_success_fails(tmp_path, monkeypatch):
    """A delivery that succeeded but could not be recorded (database full) is retried after its
    backoff, not on every pass, and it does not block the other deliveries."""
    from tests.node.test_state_machine import Clock, FakeNode, FakeScreener, part10

    clock = Clock()
    sender = OneShotSender()
    import dataclasses

    from screener import config

    base = config.Settings()
    settings = dataclasses.replace(
        base,
        node=dataclasses.replace(base.node, var_dir=str(tmp_path / "var")),
        schedule=dataclasses.replace(base.schedule, study_stable_s=1, send_backoff_s=30, send_retries=5),
        destinations=[config.Destination("A", "h", 1)],
    )
    node = FakeNode(
        settings, engines={}, screener=FakeScreener({}), sender=sender, clock=clock.time, monotonic=clock.monotonic
    )
    try:
        studies = ["1.2.3.4.5.1", "1.2.3.4.5.2"]
        for i, study in enumerate(studies):
            node.store.store_instance(
                part10(study, f"1.2.3.4.6.{i}"), "1.2.840.10008.5.1.4.1.1.1.1", f"1.2.3.4.6.{i}", study, study + ".1",
                "1.2.840.10008.1.2.1", "M", "x",
            )  # fmt: skip
        clock.mono += 2
        node.tick()
        assert [s.state for s in map(node.store.get_study, studies)] == ["reported", "reported"]
        real = node.store.mark_sent
        fails = {"n": 0}

        def mark_sent(outbox_id):
            if outbox_id == 1:
                fails["n"] += 1
                raise sqlite3.OperationalError("database or disk is full")
            return real(outbox_id)

        monkeypatch.setattr(node.store, "mark_sent", mark_sent)
        for _ in range(20):  # twenty passes in a row, as the send job would make every second
            node.send_due()
        assert sender.calls == 2  # each SR once: the failed record does not trigger a storm
        assert node.store.get_study(studies[1]).state == "sent"  # no head-of-line blocking
        clock.mono += 31
        monkeypatch.setattr(node.store, "mark_sent", real)
        node.send_due()
        assert sender.calls == 3 and node.store.get_study(studies[0]).state == "sent"
    finally:
        node.store.close()


def test_environment_error_classification():
    from screener.node import is_environment_error

    assert is_environment_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_environment_error(sqlite3.OperationalError("database or disk is full"))
    assert not is_environment_error(OSError(errno.EACCES, "Permission denied"))
    assert not is_environment_error(KeyError("x"))
