"""Fixtures for the pipeline tests: a tiny engine folder and small DX files (fast on 2 cores)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from screener.config import RoutingRule
from screener.engine import manifest as mf
from screener.engine import preprocessing as pp
from screener.engine.runtime import load_engine
from tests.support.dicom_factory import make_dx, make_study_ids
from trainer import export
from trainer.model import ProbabilityHead

SIZE = 32
RULES = [RoutingRule(name="lateral", engines=["spondylosis"], modality=["DX", "CR"], view_position=["LL", "RL", "LAT"])]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)
        )
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def tiny_engine_folder(root, with_torch: bool = False):
    folder = root / "spondylosis"
    head = ProbabilityHead(TinyNet()).eval()
    fp32 = export.export_onnx(head, folder / "model.onnx", SIZE)
    backends = [export.backend_record("onnx-fp32", fp32, folder, "fp32")]
    if with_torch:
        pt2 = export.export_torch_program(head, folder / "model.pt2", SIZE)
        backends.append(export.backend_record("torch", pt2, folder, "fp32"))
    man = mf.Manifest(
        task="spondylosis",
        version="test-1",
        created="2026-01-01T00:00:00+00:00",
        kind="classifier",
        input_size=SIZE,
        input_name="image",
        output_name="probability",
        preprocessing=pp.Recipe("tiny", crop="centre", centre_size=96, image_size=SIZE),
        normalization=pp.IMAGENET,
        class_names=["healthy", "spondylosis"],
        threshold=mf.Threshold(0.5, "fixed"),
        metrics={},
        data={},
        training={},
        backends=backends,
        demo=True,
    )
    mf.write(man, folder)
    return folder, head


@pytest.fixture(scope="session")
def tiny_engine(tmp_path_factory):
    folder, _ = tiny_engine_folder(tmp_path_factory.mktemp("pipeline-engine"))
    return {"spondylosis": load_engine(folder, "onnx-fp32")}


def gray_image(seed: int, size: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = 60 + 120 * np.exp(-(((x - size / 2) / (size / 5)) ** 2)) + rng.normal(0, 10, (size, size))
    return np.clip(base, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def dx_folder(tmp_path_factory):
    """10 small DX files, one AP (not routed), one corrupt, one not DICOM."""
    root = tmp_path_factory.mktemp("dx")
    study = make_study_ids()
    for i in range(8):
        make_dx(gray_image(i), study, "LL", instance_number=i + 1).save_as(
            root / f"img{i}.dcm", enforce_file_format=True
        )
    make_dx(gray_image(20), study, "AP").save_as(root / "ap.dcm", enforce_file_format=True)
    bad = make_dx(gray_image(21), study, "LL")
    bad.PixelData = b"\x01\x02"
    bad.save_as(root / "corrupt.dcm", enforce_file_format=True)
    (root / "notes.txt").write_text("not dicom")
    return root
