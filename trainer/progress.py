"""Progress bars: redrawn often on a terminal, rarely when stderr goes to a file (CI logs)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

INTERVAL = 0.5 if sys.stderr.isatty() else 30.0

T = TypeVar("T")


def bar(items: Iterable[T], desc: str, unit: str, enabled: bool) -> tqdm[T]:
    """A transient tqdm bar over `items` (nothing drawn when not `enabled`)."""
    return tqdm(items, desc=desc, unit=unit, disable=not enabled, leave=False, mininterval=INTERVAL)


def write(message: str) -> None:
    """A line above the bars."""
    tqdm.write(message)
