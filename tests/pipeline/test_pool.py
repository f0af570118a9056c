"""screener.pipeline.pool: isolated workers; crashes, memory, timeouts fail one item; no orphans."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from screener.pipeline.pool import Failure, WorkerPool
from tests.pipeline import tasks


def children_of(pid: int) -> set[int]:
    """Live child processes of `pid` (from /proc; zombies excluded)."""
    kids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.add(int(entry.name))
    return kids


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2, memory_limit_mb=768, timeout_s=5.0, preload=("tests.pipeline.tasks",)) as p:
        yield p


def results(pool, fn, items):
    return dict(pool.map(fn, items))


def test_results_for_every_item(pool):
    assert results(pool, tasks.echo, range(7)) == {i: 2 * i for i in range(7)}


def test_abort_fails_that_item_and_the_rest_go_on(pool):
    got = results(pool, tasks.abort_on_3, range(6))
    assert isinstance(got[3], Failure) and "aborted" in got[3].reason and got[3].kind == "died"
    assert {i: v for i, v in got.items() if i != 3} == {i: 2 * i for i in range(6) if i != 3}
    assert len(pool.pids()) == 2  # replaced
    assert results(pool, tasks.echo, [1]) == {0: 2}


def test_segfault_fails_that_item(pool):
    got = results(pool, tasks.segfault_on_2, range(4))
    assert isinstance(got[2], Failure) and "segmentation fault" in got[2].reason
    assert got[3] == 3


def test_exception_reason_has_no_message_text(pool):
    got = results(pool, tasks.raise_on_1, range(3))
    assert isinstance(got[1], Failure)
    assert "RuntimeError" in got[1].reason and "PATIENT" not in got[1].reason
    assert got[0] == 0 and got[2] == 2


def test_memory_limit_fails_the_item(pool):
    got = results(pool, tasks.allocate_mb, [8, 2048, 8])
    assert got[0] == 1 and got[2] == 1
    assert isinstance(got[1], Failure) and "memory" in got[1].reason and got[1].kind == "memory"


def test_timeout_kills_and_replaces_the_worker():
    with WorkerPool(1, timeout_s=0.5, preload=("tests.pipeline.tasks",)) as p:
        before = set(p.pids())
        t0 = time.monotonic()
        got = dict(p.map(tasks.sleep_s, [30.0, 0.01]))
        assert time.monotonic() - t0 < 20
        assert isinstance(got[0], Failure) and "longer than" in got[0].reason and got[0].kind == "timeout"
        assert got[1] == 0.01
        assert set(p.pids()).isdisjoint(before)


def test_close_leaves_no_processes():
    p = WorkerPool(2)
    pids = set(p.pids())
    assert pids and pids <= children_of(os.getpid())
    dict(p.map(tasks.abort_on_3, range(5)))  # a replacement too
    pids |= set(p.pids())
    p.close()
    assert not (pids & children_of(os.getpid()))
    with pytest.raises(RuntimeError):
        dict(p.map(tasks.echo, [1]))


def test_abandoned_map_leaves_pool_usable(pool):
    it = pool.map(tasks.sleep_s, [0.2, 0.2, 0.2, 0.2])
    next(it)
    it.close()
    assert results(pool, tasks.echo, [5]) == {0: 10}


def test_workers_run_at_lower_priority():
    """`nice`: receiving images goes first; the decode workers take what is left."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    with WorkerPool(1, nice=7) as p:
        (pid,) = p.pids()
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, base + 7)
