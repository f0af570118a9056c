"""Per-image results of screening (built in the workers, completed by the engines)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from screener.routing import Route


@dataclass(frozen=True)
class EngineResult:
    engine: str  # task name: spondylosis | stenosis
    version: str
    backend: str
    probability: float
    present: bool
    threshold: float
    roi: tuple[float, float, float, float] | None
    seconds: float  # inference time per image (batch time / batch size)


@dataclass
class ImageOutcome:
    path: Path
    sop_instance_uid: str = ""
    study_uid: str = ""
    header: pydicom.Dataset | None = None  # no pixel data
    route: Route | None = None
    results: list[EngineResult] = field(default_factory=list)
    skipped: str = ""  # reason the image was not screened (not an error of the node)
    failed: str = ""  # reason the image could not be screened (bad data)
    decode_seconds: float = 0.0
    # The decode worker died (a decoder crash, killed) or overran on this image: what a
    # quarantine counts (an image that keeps crashing workers must not be retried forever).
    crashed: bool = False

    @property
    def state(self) -> str:
        if self.failed:
            return "failed"
        if self.skipped:
            return "skipped"
        return "screened"
