"""The ROI model: a ResNet18 with an integral-regression box head (what is exported)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.model import load_pretrained


class BoxRegressor(nn.Module):
    """ResNet18 -> normalized box (x0, y0, x1, y1) relative to the letterboxed input, shape (N, 4).

    Integral regression: a light FPN (layer4, upsampled by a stride-2 transposed convolution,
    added to layer3: stride 16) gives one logit map per box edge; each edge is the expected
    coordinate under the softmax of its map (the grid's first and last cell centres mapped to
    0 and 1), so x0 <= x1 and y0 <= y1 after ordering. Input sizes must be multiples of 32.
    This module is what is exported (input ``image``, output ``box``)."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.backbone = resnet18(weights=None)
        self.backbone.fc = nn.Identity()  # unused: the head reads layer3 and layer4
        self.lateral = nn.Conv2d(256, 128, 1)
        self.top = nn.ConvTranspose2d(512, 128, 2, stride=2)
        self.edges = nn.Sequential(
            nn.Conv2d(128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True), nn.Conv2d(128, 4, 1)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(image))))
        c3 = b.layer3(b.layer2(b.layer1(x)))
        c4 = b.layer4(c3)
        # input sizes are multiples of 32, so layer4 is exactly half of layer3; a transposed convolution
        # upsamples it (an ONNX Resize would defeat the int8 quantizer's symbolic shape inference)
        f = self.lateral(c3) + self.top(c4)
        logits = self.edges(f)  # (N, 4, H, W): left, right, top, bottom
        h, w = logits.shape[-2:]
        gx = (
            torch.linspace(0.0, 1.0, w, device=logits.device, dtype=logits.dtype)
            if w > 1
            else torch.full((1,), 0.5, device=logits.device, dtype=logits.dtype)
        )
        gy = (
            torch.linspace(0.0, 1.0, h, device=logits.device, dtype=logits.dtype)
            if h > 1
            else torch.full((1,), 0.5, device=logits.device, dtype=logits.dtype)
        )
        # per edge a softmax over the whole map, then its marginal along the edge's axis
        # (no ReduceLogSumExp: the int8 quantizer's shape inference does not know it)
        p = torch.softmax(logits.reshape(-1, 4, h * w), dim=-1).reshape(-1, 4, h, w)
        px = p[:, 0:2].sum(dim=2)  # (N, 2, W): x marginals of the left and right edges
        py = p[:, 2:4].sum(dim=3)  # (N, 2, H): y marginals of the top and bottom edges
        xs = (px * gx).sum(-1)
        ys = (py * gy).sum(-1)
        x0, x1 = torch.minimum(xs[:, 0], xs[:, 1]), torch.maximum(xs[:, 0], xs[:, 1])
        y0, y1 = torch.minimum(ys[:, 0], ys[:, 1]), torch.maximum(ys[:, 0], ys[:, 1])
        return torch.stack([x0, y0, x1, y1], dim=1)


def load_pretrained_resnet18(model: BoxRegressor, path: Path | None) -> dict[str, Any]:
    """A local torchvision ResNet18 ImageNet state dict into the backbone (fc skipped); never downloads."""
    return asdict(load_pretrained(model.backbone, path, arch="ResNet18"))
