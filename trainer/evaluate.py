"""`trainer evaluate`: audit a built engine on the held-out test split of a data set.

The engine runs through the node's own runtime (the backend named), on inputs
from the shared preprocessing. The threshold is the manifest's (chosen on
validation at build time); nothing is re-tuned on test.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from screener.engine import metrics, report
from screener.engine import preprocessing as pp
from screener.errors import UserError
from screener.logs import get_logger
from trainer.build import load_prepared
from trainer.splits import SplitSpec

log = get_logger(__name__)


def engine_probabilities(runtime, images: np.ndarray, norm: pp.Normalization, batch: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        x = np.stack([pp.normalize(img, norm) for img in images[i : i + batch]])
        out.append(np.asarray(runtime.predict(x), dtype=np.float64).reshape(len(x), -1)[:, -1])
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_engine(
    engine_dir: Path, data: Path, out: Path, backend: str = "onnx-fp32", progress: bool = True
) -> dict[str, Path]:
    from screener.engine.runtime import load_engine

    loaded = load_engine(engine_dir, backend)
    man = loaded.manifest
    if man.kind != "classifier" or man.threshold is None:
        raise UserError(f"{engine_dir}: `trainer evaluate` handles classifier engines")
    seed = int(man.data.get("split_seed", SplitSpec().seed))
    prepared = load_prepared(data, man.preprocessing, SplitSpec(seed=seed), progress, man.task)
    same_data = prepared.fingerprint == man.data.get("fingerprint")
    if not same_data:
        log.warning(
            "data_differs_from_training",
            engine=man.version,
            note="fingerprint differs: the test split is not the build's test split",
        )
    val_x, val_y = prepared.part("validation")
    test_x, test_y = prepared.part("test")
    p_val = engine_probabilities(loaded.runtime, val_x, man.normalization)
    p_test = engine_probabilities(loaded.runtime, test_x, man.normalization)
    ev = metrics.evaluate(val_y, p_val, test_y, p_test, class_names=tuple(man.class_names))
    thr = man.threshold.value
    ev = dataclasses.replace(
        ev,
        threshold=dataclasses.replace(
            ev.threshold, threshold=thr, method=f"from the engine manifest: {man.threshold.method}"
        ),
        test=metrics.binary_metrics(test_y, p_test, thr),
        validation=metrics.binary_metrics(val_y, p_val, thr, predictor="model (validation)"),
    )
    extra = {
        "engine": str(engine_dir),
        "engine_version": man.version,
        "backend": loaded.backend.name,
        "backend_sha256": loaded.backend.sha256,
        "data_fingerprint": prepared.fingerprint,
        "same_data_as_build": same_data,
        "manifest_test_auroc": man.metrics.get("test", {}).get("auroc"),
        "data_problems": prepared.load_report.summary(),
        "validated": man.validated,
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = report.write_report(
        out,
        ev,
        extra=extra,
        y_test=test_y,
        p_test=p_test,
        title=f"Audit of {man.task} engine {man.version} ({loaded.backend.name})",
    )
    return {"report.md": paths["markdown"], "report.json": paths["json"]}
