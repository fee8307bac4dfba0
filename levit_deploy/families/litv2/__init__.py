"""LITv2 (Pan et al. 2022): three variants, the official checkpoint layout, an exportable deformable
convolution, three fusion steps."""
from __future__ import annotations

import dataclasses

import torch

from ...preprocess import IMAGENET_EVAL
from ..base import Detection, Family
from . import fusion
from .config import ALIASES, VARIANTS, LITv2Config, get_config
from .layouts import detect_variant
from .model import LITv2, count_flops

#: the deformable-conv form each target runs fastest, measured (benchmarks/results/deform_conv.md); the
#: numbers are the same either way. ONNX Runtime's own DeformConv kernel is fastest there (fp32 only, opset
#: 19; otherwise the gather form); OpenVINO runs it as its DeformableConvolution op (the openvino backend
#: maps ONNX DeformConv onto it), faster than its GridSample. Core ML and TensorRT (unmeasured here: no
#: macOS, no GPU) get GridSample, which both implement natively (Core ML's resample, IGridSampleLayer).
DEFORM_METHOD = {"onnx": "deformconv", "openvino": "deformconv", "coreml": "grid_sample", "tensorrt": "grid_sample"}


class LITv2Family(Family):
    name = "litv2"
    title = "LITv2 (Pan et al. 2022)"
    variants = VARIANTS
    aliases = ALIASES
    fixed_size_reason = ("the official code fixes every stage's token grid at construction (56, 28, 14, 7 at 224) "
                         "and its Hi-Fi windows have no padding")
    # classification/data/build.py build_transform(is_train=False) at 224 with TEST.CROP: resize the shorter
    # side to int(256/224 * 224) = 256 (bicubic), centre-crop 224, ImageNet mean/std
    specs = {"official": dataclasses.replace(IMAGENET_EVAL, source="official")}
    model_class = LITv2  # the fusion steps leave it deploy-ready: no BatchNorm, scale and affines folded
    make_config = staticmethod(get_config)
    steps = fusion.STEPS
    flops = staticmethod(count_flops)
    locate_units = ("patch_embed", "layers.*.blocks.*", "layers.*.downsample", "norm", "head")

    def detect(self, sd: dict[str, torch.Tensor]) -> Detection:
        config = detect_variant(sd)
        return Detection("official", config, {"alpha": config.alpha, "local_windows": list(config.local_ws)})

    def choose_for_target(self, model: LITv2, target: str, precision: str, options) -> dict:
        method = DEFORM_METHOD.get(target, "gather")
        if method == "deformconv" and (precision != "fp32" or getattr(options, "opset", 19) < 19):
            method = "gather"
        model.set_deform_method(method)
        return {"deformable_conv": method}

    def describe(self, config: LITv2Config) -> dict:
        return {"alpha": config.alpha, "local_windows": list(config.local_ws)}


FAMILY = LITv2Family()
