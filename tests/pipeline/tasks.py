"""Worker tasks for the pool tests (module-level so that spawned workers can import them)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from screener.pipeline.prepare import Job, Prepared, prepare_file

__all__ = ["prepare_file"]

POISON = "poisoned"  # a file whose name contains this crashes the test task


def echo(x: int) -> int:
    return x * 2


def abort_on_3(x: int) -> int:
    if x == 3:
        os.abort()
    return x * 2


def segfault_on_2(x: int) -> int:
    if x == 2:
        import ctypes

        ctypes.string_at(0)
    return x


def raise_on_1(x: int) -> int:
    if x == 1:
        raise RuntimeError("secret header value PATIENT^NAME")
    return x


def allocate_mb(mb: int) -> int:
    import numpy as np

    a = np.ones(mb * 1024 * 1024, np.uint8)
    return int(a[-1])


def sleep_s(s: float) -> float:
    time.sleep(s)
    return s


def prepare_or_crash(job: Job) -> Prepared:
    """prepare_file, except that a poisoned file aborts the worker (as gdcm does on some streams)."""
    if POISON in Path(job.path).name:
        os.abort()
    return prepare_file(job)
