import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

from trainer.data.csxa import KEYPOINT_LABELS  # noqa: E402

HEADER = [
    "Number",
    "Gender:female-1,male-0",
    "Age",
    "Disease classification: 1. Cervical spondylosis; 2. Healthy",
    "Curvature: 1.Lordotic, 2.Straight, 3.Sigmoid1, 4.Sigmoid2, 5.Kyphotic",
    "C2-7Cobb",
]


def write_sheet(path: Path, rows, header=HEADER, super_header=True):
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    if super_header:
        ws.append([super_header if isinstance(super_header, str) else "CSXA measurements"])
    ws.append(header)
    for r in rows:
        ws.append(list(r))
    wb.save(path)


def keypoint_shapes(x0=100.0, y0=100.0, step=40.0):
    shapes = []
    for i, label in enumerate(KEYPOINT_LABELS):
        shapes.append(
            {
                "label": label,
                "points": [[x0 + (i % 2) * 60, y0 + i * step / 4]],
                "shape_type": "point",
                "group_id": None,
                "flags": {},
            }
        )
    return shapes


def make_mini_csxa(root: Path, rows, image_size=(300, 260)):
    """rows: (number, gender, age, disease) ; an image+json written for each unless number in `missing`."""
    (root / "datasets-PNG").mkdir(parents=True)
    (root / "datasets-JSON").mkdir(parents=True)
    write_sheet(root / "datasets.xlsx", [(n, g, a, d, 1, 10.0) for n, g, a, d in rows])
    for n, g, a, d in rows:
        stem = f"{n:04d}{g}{a:02d}"
        img = np.zeros(image_size, np.uint8)
        cv2.rectangle(img, (100, 100), (170, 250), 200 if d == 1 else 120, -1)
        cv2.imwrite(str(root / "datasets-PNG" / f"{stem}.png"), img)
        (root / "datasets-JSON" / f"{stem}.json").write_text(
            json.dumps(
                {
                    "version": "4.5.6",
                    "flags": {},
                    "shapes": keypoint_shapes(),
                    "imagePath": f"{stem}.png",
                    "imageData": None,
                    "imageHeight": image_size[0],
                    "imageWidth": image_size[1],
                }
            )
        )
    return root


@pytest.fixture
def mini_csxa(tmp_path):
    rows = [(1, 0, 35, 1), (2, 0, 35, 1), (3, 1, 50, 2), (4, 1, 51, 1), (5, 0, 60, 1), (6, 0, 60, 1)]
    return make_mini_csxa(tmp_path / "csxa", rows)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """One small spondylosis engine for the whole session: (BuildOptions, engine folder)."""
    from trainer.build import BuildOptions, build_engine
    from trainer.synth import synthesize

    root = tmp_path_factory.mktemp("e2e")
    data = root / "synth"
    synthesize(data, n=72, seed=7, healthy_fraction=0.3)
    opts = BuildOptions(
        task="spondylosis",
        data=data,
        out=root / "engines",
        image_size=64,
        epochs=2,
        batch_size=8,
        progress=False,
        n_boot=200,
        augment="light",
        demo=True,
    )
    return opts, build_engine(opts)


@pytest.fixture(scope="session")
def all_engines(built, tmp_path_factory):
    """spondylosis + roi + stenosis engines in one engines folder (small, for tests)."""
    import shutil

    from trainer.build import BuildOptions, build_engine
    from trainer.synth import synthesize_oblique

    root = tmp_path_factory.mktemp("all-engines")
    engines = root / "engines"
    engines.mkdir()
    shutil.copytree(built[1], engines / "spondylosis")
    oblique = root / "oblique"
    synthesize_oblique(oblique, n=64, seed=5, positive_fraction=0.4, annotated_fraction=0.6)
    roi = build_engine(
        BuildOptions(
            task="roi",
            data=built[0].data,
            extra_data=(oblique,),
            out=engines,
            image_size=64,
            epochs=1,
            batch_size=8,
            progress=False,
            n_boot=100,
            demo=True,
        )
    )
    stenosis = build_engine(
        BuildOptions(
            task="stenosis",
            data=oblique,
            roi_engine=roi,
            out=engines,
            image_size=64,
            epochs=1,
            batch_size=8,
            progress=False,
            n_boot=100,
            demo=True,
            augment="light",
        )
    )
    return {"dir": engines, "oblique": oblique, "roi": roi, "stenosis": stenosis}


@pytest.fixture(autouse=True)
def _restore_logging_config():
    """A test that starts a node configures structlog (level, renderer) for the whole process; give the
    next test the configuration it started with, so log-capturing tests do not depend on test order."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
