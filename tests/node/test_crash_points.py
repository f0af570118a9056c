"""Crash-point sweep: the node (a real `screener serve` subprocess) dies with os._exit at each named
crash point (screener/store/crash.py), the committed state is checked as it was left, the node is
restarted and must deliver, for every study, a last SR that references every acknowledged instance.

Scenario per point: study A (2 images) and study B (1 image) in one association; once both SRs are
delivered, a late image for A (its second SR supersedes the first, with a predecessor reference and
instance number 2); then retention deletes the superseded SR file. ``sr_folder`` is set, so the
folder copy is one more delivery. The process must die at the point (every point is reached)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pydicom
import pytest

from screener.store import crash
from tests.node.state_helpers import (
    CRASH_EXIT,
    Modality,
    NodeProcess,
    fast_settings,
    quiescent,
    read_store,
    record_stats,
    small_gray,
    verdict,
    wait_until,
)
from tests.support.node_helpers import CollectingSCP


def test_points_list_matches_code():
    """Every point named in the code is in crash.POINTS and every listed point is in the code."""
    root = Path(__file__).resolve().parents[2] / "screener"
    used = set()
    for path in root.rglob("*.py"):
        used |= set(re.findall(r'crash\.point\("([a-z_.]+)"\)', path.read_text()))
    assert used == set(crash.POINTS)


def test_crash_point_env(monkeypatch):
    """NAME:N exits at the N-th hit; a handler sees every point."""
    seen = []
    crash.set_handler(seen.append)
    try:
        monkeypatch.delenv(crash.ENV, raising=False)
        crash.point("node.after_pick")
    finally:
        crash.set_handler(None)
    assert seen == ["node.after_pick"]


@pytest.fixture
def engines_dir(built):
    return built[1].parent


@pytest.mark.slow
@pytest.mark.parametrize("point", crash.POINTS)
def test_crash_at_point_then_recover(point, tmp_path, built, engines_dir):
    gray = small_gray(built[0].data)
    scp = CollectingSCP().start()
    folder = tmp_path / "sr-folder"
    var = tmp_path / "var"
    settings = dataclasses.replace(fast_settings(var, engines_dir, [scp.destination]), sr_folder=str(folder))
    mod = Modality()
    study_a, imgs_a = mod.study(gray, 2)
    study_b, imgs_b = mod.study(gray, 1)
    late = mod.late(gray, study_a)
    node = NodeProcess(settings, tmp_path, env={crash.ENV: point}).start()
    try:
        # Run 1: the scenario until the process dies at the point.
        if node.alive:
            mod.send(imgs_a + imgs_b, node.port)
            wait_until(lambda: len(scp.received) >= 2, 30, alive=lambda: node.alive)
        if node.alive:
            mod.send(late, node.port)
            wait_until(
                lambda: any(len(ds.get("PredecessorDocumentsSequence", [])) for ds in scp.received),
                30,
                alive=lambda: node.alive,
            )
        if node.alive:

            def superseded_deleted() -> bool:
                with read_store(var) as s:
                    return any(r.state == "deleted" for r in s.srs_of(study_a))

            wait_until(superseded_deleted, 30, alive=lambda: node.alive)
        code = node.wait(30)
        assert code == CRASH_EXIT, f"crash point {point} not reached (exit {code}):\n" + "\n".join(node.lines[-20:])

        # The committed state as the crash left it keeps the invariant (no recovery has run).
        with read_store(var) as s:
            assert s.check_invariants() == []

        # Run 2: restart, the modality re-sends what was not acknowledged (and a repeat of the rest).
        node = NodeProcess(settings, tmp_path).start()
        assert node.alive, "\n".join(node.lines[-20:])
        mod.send(imgs_a + imgs_b, node.port)
        assert wait_until(lambda: quiescent(var), 60, alive=lambda: node.alive), "\n".join(node.lines[-20:])
        mod.send(late, node.port)
        assert wait_until(lambda: quiescent(var), 60, alive=lambda: node.alive), "\n".join(node.lines[-20:])

        def no_superseded_file_left() -> bool:
            with read_store(var) as s:
                return all(r.state != "superseded" for r in s.srs_of(study_a))

        assert wait_until(no_superseded_file_left, 30, alive=lambda: node.alive)  # the next retention pass
        assert node.terminate(30) == 0  # graceful stop
    finally:
        node.kill()
        scp.stop()

    v = verdict(var, mod, scp.received)
    record_stats(f"crash:{point}", v.as_dict())
    assert v.violations == [] and v.details == [], (v.violations, v.details)
    assert (v.acknowledged, v.missing, v.stuck, v.stale_last) == (4, 0, 0, 0)
    with read_store(var) as s:
        srs = s.srs_of(study_a)
        current = s.get_sr(s.get_study(study_a).sr_id)
        assert current.instance_number == len(srs) >= 2
        # sr_folder holds exactly the current SR of each study.
        names = sorted(p.name for p in folder.iterdir())
        want = sorted(f"{s.get_study(u).sr_sop_instance_uid}.dcm" for u in (study_a, study_b))
        assert names == want
        # Superseded SR files are gone from var/sr once retention ran.
        assert all(not s.abs_path(r.path).exists() for r in srs if r.state != "current")
    last_a = [ds for ds in scp.received if ds.StudyInstanceUID == study_a][-1]
    ref = last_a.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in ref} == {r.sop_instance_uid for r in srs if r.id != current.id}
    assert int(last_a.InstanceNumber) == current.instance_number
    assert isinstance(last_a, pydicom.Dataset)
