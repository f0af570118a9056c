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


def compare_routes(job: Job) -> str:
    """The worker's route (native view, lookup table mapped where read) against the reference
    route (``dataset_to_gray8`` on the whole frame) for one file: "" when they give the same
    outcome and the same model images, else what differs (no header values)."""
    import numpy as np

    from screener.pipeline.prepare import prepare_file_reference

    fast, ref = prepare_file(job), prepare_file_reference(job)
    a, b = fast.outcome, ref.outcome
    if (a.state, bool(a.failed), bool(a.skipped)) != (b.state, bool(b.failed), bool(b.skipped)):
        return f"state {a.state} != {b.state}"
    if sorted(fast.inputs) != sorted(ref.inputs):
        return "different engines"
    for name in fast.inputs:
        if not np.array_equal(fast.inputs[name], ref.inputs[name]):
            return f"{name}: model image differs"
    return ""
