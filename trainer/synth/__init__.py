"""Synthetic data sets in the real layouts: lateral views (CSXA, spondylosis) and oblique views (foraminal
stenosis, docs/stenosis-data.md). ``drawing`` holds what both generators share."""

from trainer.synth.drawing import SynthResult
from trainer.synth.lateral import KEYPOINT_LABELS, synthesize
from trainer.synth.oblique import synthesize_oblique

__all__ = ["KEYPOINT_LABELS", "SynthResult", "synthesize", "synthesize_oblique"]
