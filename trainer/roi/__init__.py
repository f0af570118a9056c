"""`trainer build-engine --task roi`: the engine that finds the cervical spine in a radiograph.

It gives the node the box that annotations give the trainer (the spondylosis ``crop`` /
``wide_crop`` recipes, the stenosis ROI crop). Trained on

* lateral views: the box of the 23 CSXA keypoints (``trainer.data.csxa``);
* oblique views: LabelMe rectangles labelled ``cspine`` (``trainer.data.oblique``); images
  without one are skipped and counted (a data set may annotate only part of its images).

Model: a torchvision ResNet18 (random init, or a local ``--pretrained`` ResNet18 state
dict) with an integral-regression head: layer4 upsampled onto layer3 (stride 16), one logit
map per box edge, each edge the expected coordinate under its map's softmax. Output: the
normalized box (x0, y0, x1, y1) relative to the letterboxed square the ``roi_input`` recipe
feeds it (x0 <= x1, y0 <= y1). The spatial head learned clearly faster than global pooling +
4 sigmoid outputs (300 synthetic images, 128 px, 12 epochs: validation mean IoU 0.77 vs 0.70).
The input is the shared preprocessing (``prepare`` with crop ``full``, then ``normalize``);
``screener.engine.roi`` maps the output back to source pixels, on the trainer and on the node alike.

Loss: 5 x smooth L1 (beta 0.02) on the normalized coordinates + 2 x (1 - GIoU).
Augmentation (training only; each keeps the box exact): horizontal flip, scale
0.85-1.15 and a shift of up to 8 % of the side that keeps the box inside the image,
gain and gamma of the gray levels (black stays black, like the letterbox padding).
The geometric jitter is applied to the letterboxed gray square rather than to the
source image: for the gray colour mode this is the same affine map up to where the
black padding ends, and it lets every image be decoded and prepared once, not every epoch.
Adam, cosine learning-rate schedule, early stopping on validation mean IoU, best
checkpoint kept, resumable (``<out>/.work/roi``).

Evaluation (held-out test split, grouped by patient): mean and median IoU, the share
of images with IoU >= 0.7 and the share whose ``wide_crop`` window of the predicted box
(the box grown by 200 px above/below and 100 px left/right, clipped to the image, before
the square step) contains the annotated box. Written to report.md / report.json and
the manifest (``metrics.test``).

Modules: ``data`` (annotated boxes, prepared images, augmentation, dataset), ``model``,
``train`` (the loop), ``evaluate`` (box metrics and the report), ``build`` (the build; its
checkpoint, export-and-gate and finishing steps are the classifiers' ``trainer.steps``).
"""

from trainer.roi.build import CLASS_NAMES, RECIPE_NAME, build_roi_engine
from trainer.roi.data import (
    AUGMENT_PRESETS,
    NO_AUGMENT,
    RoiAugment,
    RoiData,
    RoiDataset,
    RoiItem,
    augment_roi,
    gray_normalization,
    prepare_roi_data,
    roi_items_from,
    root_kind,
    tensors,
)
from trainer.roi.evaluate import (
    IOU_GOOD,
    TARGET_CONTAINMENT,
    TARGET_MEAN_IOU,
    bootstrap_mean_ci,
    box_metrics,
    iou,
    per_image_iou,
    to_source,
    wide_window,
    write_roi_report,
)
from trainer.roi.model import BoxRegressor, load_pretrained_resnet18
from trainer.roi.train import DEFAULT_BATCH, RoiTrainConfig, RoiTrainResult, predict_normalized, train_roi
from trainer.steps import INT8_TOLERANCE

__all__ = [
    "AUGMENT_PRESETS",
    "CLASS_NAMES",
    "DEFAULT_BATCH",
    "INT8_TOLERANCE",
    "IOU_GOOD",
    "NO_AUGMENT",
    "RECIPE_NAME",
    "TARGET_CONTAINMENT",
    "TARGET_MEAN_IOU",
    "BoxRegressor",
    "RoiAugment",
    "RoiData",
    "RoiDataset",
    "RoiItem",
    "RoiTrainConfig",
    "RoiTrainResult",
    "augment_roi",
    "bootstrap_mean_ci",
    "box_metrics",
    "build_roi_engine",
    "gray_normalization",
    "iou",
    "load_pretrained_resnet18",
    "per_image_iou",
    "predict_normalized",
    "prepare_roi_data",
    "roi_items_from",
    "root_kind",
    "tensors",
    "to_source",
    "train_roi",
    "wide_window",
    "write_roi_report",
]
