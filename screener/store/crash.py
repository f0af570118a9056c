"""Named crash points, for the crash tests (docs/state-machine.md, "Crash points").

`point(name)` is called between every pair of commits of the store and the node and around every
delivery of an SR. It does nothing unless

* the environment variable ``SCREENER_CRASH_AT`` is ``NAME`` or ``NAME:N``: the process ends with
  ``os._exit(CRASH_EXIT)`` at the first (or N-th) time it reaches that point, like a kill -9 (no
  cleanup, no flush, no atexit); or
* a test installed a handler with `set_handler` (in-process tests raise a BaseException from it to
  abandon the job where it stands).

`POINTS` lists every point; tests/node/test_crash_points.py checks that the list and the code agree
and triggers each one.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable

ENV = "SCREENER_CRASH_AT"
CRASH_EXIT = 86

POINTS: tuple[str, ...] = (
    # store
    "store.before_instance_commit",  # spool file renamed into place, row not committed
    "store.after_instance_commit",  # row committed, C-STORE response not yet sent
    "store.after_recovery_files",  # recovery removed stray files, database not yet repaired
    "store.after_recovery_commit",  # recovery committed
    "store.after_retention_commit",  # retention deleted rows / marked SRs deleted, files not yet removed
    # node: completion and screening
    "node.after_complete",  # receiving -> complete committed
    "node.after_pick",  # complete -> screening committed (attempt counted)
    "node.after_screen",  # engines ran, nothing written
    "node.after_sr_file",  # SR file written under var/sr, finish not committed
    "node.after_finish",  # screening -> reported committed (results, instances, SR row, outbox rows)
    # node: delivery
    "node.after_claim",  # outbox attempt counted and next retry scheduled, nothing sent
    "node.after_cstore",  # C-STORE of the SR answered success, not recorded
    "node.after_folder_copy",  # SR copied into sr_folder, not recorded
    "node.after_mark_sent",  # delivery recorded
)

_lock = threading.Lock()
_hits: dict[str, int] = {}
_handler: Callable[[str], None] | None = None


def set_handler(handler: Callable[[str], None] | None) -> None:
    """Install (or with None remove) an in-process handler called at every point."""
    global _handler
    _handler = handler


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    return name, int(nth) if nth.isdigit() else 1


def point(name: str) -> None:
    """A crash point (see module doc)."""
    if _handler is not None:
        _handler(name)
    target = _target()
    if target is None or target[0] != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        hit = _hits[name]
    if hit == target[1]:
        sys.stderr.write(f"screener: crash point {name} reached ({ENV}); exiting\n")
        sys.stderr.flush()
        os._exit(CRASH_EXIT)
