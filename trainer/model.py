"""Models: ResNet50 with a binary head (optionally behind an STN), and the export wrapper.

Nothing is ever downloaded: ImageNet weights come from a local torchvision state
dict passed as ``--pretrained PATH``; without it the network starts from random
initialisation and the manifest says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50

from screener.engine.manifest import sha256_file
from screener.errors import UserError


@dataclass(frozen=True)
class PretrainedInfo:
    source: str  # "random-init" or the file name
    sha256: str = ""
    missing_keys: int = 0


def load_pretrained(model: nn.Module, path: Path | None, arch: str = "ResNet50") -> PretrainedInfo:
    """Load a local torchvision ImageNet state dict of `arch` into `model` (its fc layer is skipped)."""
    if path is None:
        return PretrainedInfo("random-init")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--pretrained {p}: file not found")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user error here
        raise UserError(f"--pretrained {p}: not a readable PyTorch state dict ({exc.__class__.__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"--pretrained {p}: expected a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch: another architecture
        raise UserError(f"--pretrained {p}: not a torchvision {arch} state dict ({str(exc).splitlines()[0]})") from None
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if result.unexpected_keys or missing:
        raise UserError(
            f"--pretrained {p}: not a torchvision {arch} state dict "
            f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected keys)"
        )
    return PretrainedInfo(p.name, sha256_file(p), len(result.missing_keys))


class SpatialTransformer(nn.Module):
    """A small affine STN (Jaderberg et al.) that aligns the spine's slope; starts at identity."""

    def __init__(self) -> None:
        super().__init__()
        self.localization = nn.Sequential(
            nn.AdaptiveAvgPool2d(64),
            nn.Conv2d(3, 8, 7),
            nn.MaxPool2d(2),
            nn.ReLU(True),
            nn.Conv2d(8, 10, 5),
            nn.MaxPool2d(2),
            nn.ReLU(True),
            nn.AdaptiveAvgPool2d(4),
        )
        hidden, theta = nn.Linear(10 * 16, 32), nn.Linear(32, 6)
        nn.init.zeros_(theta.weight)
        with torch.no_grad():
            theta.bias.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=torch.float32))
        self.fc = nn.Sequential(nn.Flatten(), hidden, nn.ReLU(True), theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.fc(self.localization(x)).view(-1, 2, 3)
        grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return nn.functional.grid_sample(x, grid, align_corners=False)


class Classifier(nn.Module):
    """ResNet50 (torchvision) with a 2-class head; optional STN in front."""

    def __init__(self, num_classes: int = 2, stn: bool = False) -> None:
        super().__init__()
        self.stn = SpatialTransformer() if stn else None
        self.backbone = resnet50(weights=None)
        self.backbone.fc = nn.Linear(self.backbone.fc.in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stn is not None:
            x = self.stn(x)
        return self.backbone(x)


class ProbabilityHead(nn.Module):
    """What is exported: image batch -> probability of the positive (last) class, shape (N,)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=1)[:, -1]


def build_classifier(pretrained: Path | None = None, stn: bool = False) -> tuple[Classifier, PretrainedInfo]:
    model = Classifier(2, stn=stn)
    info = load_pretrained(model.backbone, pretrained)
    return model, info


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
