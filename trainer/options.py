"""The options of `trainer build-engine`: one typed record that every build takes.

The classifier builds (spondylosis, stenosis) and the ROI build read the same fields; a
field that does not apply to a task says so in its comment (the ROI build refuses ``stn``
and ignores ``balance``, ``target_sensitivity`` and ``roi_engine``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from screener.errors import UserError

TASK_NAMES = ("spondylosis", "stenosis", "roi")
BACKEND_CHOICES = ("onnx", "tensorrt", "all")


@dataclass(frozen=True)
class BuildOptions:
    task: str  # spondylosis | stenosis | roi
    data: Path
    out: Path
    recipe: str = ""  # "" = the task's default
    image_size: int = 0  # 0 = the recipe's default
    epochs: int = 30
    batch_size: int = 0  # 0 = the task's default
    extra_data: tuple[Path, ...] = ()  # roi: more data roots (lateral and oblique)
    roi_engine: Path | None = None  # stenosis: boxes for unannotated images
    optimizer: str = ""  # classifiers: "" = the task's (study's) default: adam | sgd
    lr: float = 0.0  # classifiers: 0 = the task's default
    pretrained: Path | None = None  # a local torchvision state dict (ResNet50; ResNet18 for roi)
    checkpoint: Path | None = None  # skip training: use these weights
    backend: str = "onnx"  # onnx | tensorrt | all
    split_seed: int = 20241122
    target_sensitivity: float = 0.95  # classifiers: the threshold's target on validation
    augment: str = "study"  # study | light | none (each build has its own presets of these names)
    balance: str = "weights"  # classifiers: weights | oversample | none
    patience: int = 8
    validated_by: str = ""
    version: str = ""  # "" = date + data fingerprint
    demo: bool = False
    progress: bool = True
    n_boot: int = 2000
    stn: bool = False  # classifiers only

    @property
    def roots(self) -> list[Path]:
        """`data` then `extra_data`, each once, in order."""
        out: list[Path] = []
        for r in (self.data, *self.extra_data):
            p = Path(r)
            if p not in out:
                out.append(p)
        return out

    def check(self, augment_presets: tuple[str, ...] | list[str]) -> None:
        """The checks every build makes before reading any data (UserError naming the option)."""
        if self.task not in TASK_NAMES:
            raise UserError(f"--task {self.task}: expected spondylosis, stenosis or roi")
        if self.backend not in BACKEND_CHOICES:
            raise UserError(f"--backend {self.backend}: expected onnx, tensorrt or all")
        if self.augment not in augment_presets:
            raise UserError(f"--augment {self.augment}: expected one of {', '.join(augment_presets)}")
