"""The parallel data path gives the serial path's results; bad files fail alone; replay finishes."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from screener.config import PipelineSettings
from screener.engine import preprocessing as pp
from screener.replay import replay
from screener.screening import Screener
from tests.pipeline import tasks
from tests.pipeline.conftest import RULES
from tests.pipeline.test_pool import children_of

SETTINGS = PipelineSettings(workers=2, memory_limit_mb=1024, image_timeout_s=30.0, prefetch_batches=2)


def summary(outcomes):
    return [
        (o.path.name, o.state, o.failed, o.skipped, o.sop_instance_uid, [(r.engine, r.probability) for r in o.results])
        for o in outcomes
    ]


def test_parallel_equals_serial(tiny_engine, dx_folder):
    paths = sorted(dx_folder.iterdir())
    serial = Screener(tiny_engine, RULES, batch_size=4, serial=True).screen(paths)
    with Screener(tiny_engine, RULES, batch_size=4, pipeline=SETTINGS) as s:
        parallel = s.screen(paths)
        streamed = [o for outs in s.stream(paths, 3) for o in outs]
    assert summary(parallel) == summary(serial) == summary(streamed)
    states = {o.path.name: o.state for o in serial}
    assert states["img0.dcm"] == "screened" and states["ap.dcm"] == "skipped"
    assert states["corrupt.dcm"] == "failed" and states["notes.txt"] == "failed"
    assert all(o.header is not None and "PixelData" not in o.header for o in parallel if o.state == "screened")


def test_serial_path_matches_the_reference_tensor(tiny_engine, dx_folder):
    """The worker's uint8 image + batch normalization is the shared preprocess() tensor, bit for bit."""
    s = Screener(tiny_engine, RULES, serial=True)
    man = tiny_engine["spondylosis"].manifest
    out, gray, engines = s.read(dx_folder / "img1.dcm")
    assert engines == ["spondylosis"]
    prep = s.read_many([dx_folder / "img1.dcm"]).prepared[0]
    got = pp.normalize_batch(np.stack([prep.inputs["spondylosis"]]), man.normalization)[0]
    want = pp.preprocess(gray, man.preprocessing, man.normalization)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_normalize_batch_is_bit_identical():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 17, 19, 3), dtype=np.uint8)
    want = np.stack([pp.normalize(i, pp.IMAGENET) for i in imgs])
    assert np.array_equal(pp.normalize_batch(imgs, pp.IMAGENET), want)


def test_crashing_file_fails_with_reason_and_the_batch_goes_on(tiny_engine, dx_folder, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(dx_folder, folder)
    shutil.copy(folder / "img2.dcm", folder / f"img2-{tasks.POISON}.dcm")
    paths = sorted(folder.iterdir())
    with Screener(tiny_engine, RULES, batch_size=4, pipeline=SETTINGS, task=tasks.prepare_or_crash) as s:
        outs = {o.path.name: o for o in s.screen(paths)}
        pids = set(s.pool.pids())
    bad = outs[f"img2-{tasks.POISON}.dcm"]
    assert bad.state == "failed" and "aborted" in bad.failed and bad.crashed
    assert not any(o.crashed for o in outs.values() if o is not bad)
    assert sum(o.state == "screened" for o in outs.values()) == 8
    assert not (pids & children_of(os.getpid()))


def test_close_and_reuse(tiny_engine, dx_folder):
    s = Screener(tiny_engine, RULES, pipeline=SETTINGS)
    first = s.screen([dx_folder / "img0.dcm"])
    pids = set(s.pool.pids())
    s.close()
    assert not (pids & children_of(os.getpid()))
    assert summary(s.screen([dx_folder / "img0.dcm"])) == summary(first)  # a new pool on demand
    s.close()


def test_abandoned_stream_stops_cleanly(tiny_engine, dx_folder):
    paths = sorted(dx_folder.glob("img*.dcm")) * 3
    with Screener(tiny_engine, RULES, batch_size=2, pipeline=SETTINGS) as s:
        it = s.stream(paths, 2)
        assert len(next(it)) == 2
        it.close()
        assert len(s.screen(paths[:3])) == 3


@pytest.mark.parametrize("serial", [False, True])
def test_replay_finishes_and_lists_bad_files(tiny_engine, dx_folder, tmp_path, serial):
    folder = tmp_path / "in"
    shutil.copytree(dx_folder, folder)
    shutil.copy(folder / "img3.dcm", folder / f"img3-{tasks.POISON}.dcm")
    s = Screener(tiny_engine, RULES, batch_size=4, pipeline=SETTINGS, task=tasks.prepare_or_crash, serial=serial)
    if serial:  # the in-process path would abort this test process: no poisoned file there
        (folder / f"img3-{tasks.POISON}.dcm").unlink()
        s.task = tasks.prepare_file
    out = tmp_path / "audit"
    result = replay(folder, out, s, tiny_engine, chunk=4, progress=False)
    data = json.loads((out / "summary.json").read_text())
    failed = {f["file"]: f["reason"] for f in data["failed_files"]}
    assert "corrupt.dcm" in failed and "notes.txt" in failed
    if not serial:
        assert "aborted" in failed[f"img3-{tasks.POISON}.dcm"]
    assert result.screened == 8 and data["error"] == ""
    assert (out / "sr").is_dir() and len(list((out / "sr").iterdir())) == 1


def test_memory_bomb_fails_that_image(tiny_engine, dx_folder, tmp_path):
    """A 10 KB RLE file declaring 65535 x 65535 pixels (8 GiB) fails alone under the memory limit.
    The header limits (screener.dicom.image.check_limits) refuse it before decoding by default;
    here they are lifted to show the worker's memory limit is the second line of defence."""
    from pydicom.uid import RLELossless

    from screener.config import LimitSettings
    from tests.pipeline.conftest import gray_image
    from tests.support.dicom_factory import make_dx, make_study_ids

    ds = make_dx(gray_image(1, 64), make_study_ids(), "LL")
    ds.compress(RLELossless, encoding_plugin="pylibjpeg")
    ds.Rows, ds.Columns = 65535, 65535
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    lifted = LimitSettings(max_rows=65535, max_columns=65535, max_dataset_mb=16384)
    with Screener(tiny_engine, RULES, pipeline=SETTINGS, limits=lifted) as s:
        outs = s.screen([dx_folder / "img0.dcm", bomb, dx_folder / "img1.dcm"])
    assert [o.state for o in outs] == ["screened", "failed", "screened"]
    assert "allocate" in outs[1].failed or "memory" in outs[1].failed
    with Screener(tiny_engine, RULES, pipeline=SETTINGS) as s:  # default limits: refused from the header
        outs = s.screen([bomb])
    assert outs[0].state == "failed" and "Rows exceeds the limit" in outs[0].failed
