"""The contract each engine folder carries (``engines/<task>/manifest.json``).

The node checks it on load: schema, the preprocessing recipe, that every backend
file exists and its SHA-256 matches. Written by ``trainer build-engine``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from screener.engine.preprocessing import Normalization, PixelScale, Recipe
from screener.errors import ManifestError
from screener.store.files import atomic_write

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TASKS = ("spondylosis", "stenosis", "roi")


@dataclass(frozen=True)
class Threshold:
    """Operating point: predict the positive class when probability >= value."""

    value: float
    method: str
    split: str = "validation"
    target_sensitivity: float | None = None
    achieved_sensitivity: float | None = None
    achieved_specificity: float | None = None


@dataclass(frozen=True)
class Backend:
    """One compiled artifact of the engine."""

    name: str  # onnx-fp32 | onnx-int8 | tensorrt-fp16
    file: str  # relative to the engine folder
    sha256: str
    precision: str
    kept: bool = True  # False: built and measured, but not to be used (e.g. int8 lost AUROC)
    max_abs_diff_vs_torch: float | None = None
    test_auroc: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Manifest:
    task: str
    version: str
    created: str
    kind: str  # classifier | roi
    input_size: int
    input_name: str
    output_name: str
    preprocessing: Recipe
    normalization: Normalization
    class_names: list[str]
    threshold: Threshold | None
    metrics: dict[str, Any]
    data: dict[str, Any]
    training: dict[str, Any]
    backends: list[Backend]
    validated: bool = False
    validated_by: str = ""
    demo: bool = False
    software_version: str = ""
    schema_version: int = SCHEMA_VERSION
    notes: list[str] = field(default_factory=list)
    # The training images' scale; None (manifests written before it existed): no resampling.
    pixel_scale: PixelScale | None = None

    @property
    def positive_class(self) -> str:
        return self.class_names[-1]

    def backend(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["preprocessing"] = self.preprocessing.to_dict()
        d["normalization"] = self.normalization.to_dict()
        d["pixel_scale"] = self.pixel_scale.to_dict() if self.pixel_scale else None
        return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _require(data: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if key not in data:
        raise ManifestError(f"{where}: missing '{key}'")
    value = data[key]
    if not isinstance(value, types):
        raise ManifestError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
    return value


def from_dict(data: dict[str, Any], where: str = "manifest") -> Manifest:
    """Validate and build a Manifest; ManifestError names the problem."""
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object")
    schema = data.get("schema_version", SCHEMA_VERSION)
    if schema != SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema_version {schema} is not supported (expected {SCHEMA_VERSION})")
    task = _require(data, "task", str, where)
    if task not in TASKS:
        raise ManifestError(f"{where}: unknown task {task!r}")
    try:
        rcp = Recipe.from_dict(_require(data, "preprocessing", dict, where))
        norm = Normalization.from_dict(_require(data, "normalization", dict, where))
        thr_data = data.get("threshold")
        thr = Threshold(**thr_data) if thr_data else None
        backends = [Backend(**b) for b in _require(data, "backends", list, where)]
        scale_data = data.get("pixel_scale")
        pixel_scale = PixelScale.from_dict(scale_data) if scale_data else None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ManifestError(f"{where}: {exc}") from None
    kind = _require(data, "kind", str, where)
    if kind == "classifier" and thr is None:
        raise ManifestError(f"{where}: a classifier needs a threshold")
    if not backends:
        raise ManifestError(f"{where}: no backends")
    return Manifest(
        task=task,
        version=_require(data, "version", str, where),
        created=_require(data, "created", str, where),
        kind=kind,
        input_size=_require(data, "input_size", int, where),
        input_name=_require(data, "input_name", str, where),
        output_name=_require(data, "output_name", str, where),
        preprocessing=rcp,
        normalization=norm,
        class_names=list(_require(data, "class_names", list, where)),
        threshold=thr,
        metrics=_require(data, "metrics", dict, where),
        data=_require(data, "data", dict, where),
        training=_require(data, "training", dict, where),
        backends=backends,
        validated=bool(data.get("validated", False)),
        validated_by=str(data.get("validated_by", "")),
        demo=bool(data.get("demo", False)),
        software_version=str(data.get("software_version", "")),
        schema_version=schema,
        notes=list(data.get("notes", [])),
        pixel_scale=pixel_scale,
    )


def write(manifest: Manifest, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST_NAME
    data = json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n"
    atomic_write(path, data.encode("utf-8"), mode=0o644)
    return path


def install(manifest: Manifest, building: Path, out_dir: Path) -> Path:
    """Finish a build: write the manifest into `building`, run the node's own check on it, then
    swap it into ``out_dir/<task>``, so a failed build never replaces a working engine."""
    write(manifest, building)
    load(building, verify=True)
    final = out_dir / manifest.task
    old = out_dir / f".{manifest.task}.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    building.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load(folder: Path, verify: bool = True) -> Manifest:
    """Read and check ``folder/manifest.json``; with `verify`, check every kept backend's hash."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: engine manifest not found (build it with `trainer build-engine`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON: {exc}") from None
    manifest = from_dict(data, str(path))
    if verify:
        verify_files(manifest, Path(folder))
    return manifest


def verify_files(manifest: Manifest, folder: Path) -> None:
    """Every kept backend file exists and matches its recorded SHA-256."""
    for b in manifest.backends:
        if not b.kept:
            continue
        f = folder / b.file
        if not f.is_file():
            raise ManifestError(f"{f}: backend {b.name} listed in the manifest is missing")
        digest = sha256_file(f)
        if digest != b.sha256:
            raise ManifestError(
                f"{f}: SHA-256 {digest[:12]}... does not match the manifest ({b.sha256[:12]}...); "
                "the engine was modified or corrupted"
            )


def measure_training_scale(image_paths: list[Path] | list[str], mm_per_pixel: float = 0.0) -> PixelScale | None:
    """The training images' scale for the manifest: median height read from the image headers
    (PIL, no decoding) and `mm_per_pixel` when given (0: unknown). None when no header is readable."""
    from PIL import Image

    from screener.engine.preprocessing import pixel_scale_of

    heights = []
    for p in image_paths:
        try:
            with Image.open(p) as im:
                heights.append(im.size[1])
        except (OSError, ValueError):
            continue
    if not heights:
        return None
    source = f"median height of {len(heights)} training images"
    source += "; mm per pixel given at build time" if mm_per_pixel else "; mm per pixel unknown (resampled by height)"
    return pixel_scale_of(heights, mm_per_pixel or None, source)
