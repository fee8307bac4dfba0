"""LightViT (Huang et al. 2022): three variants, hunto's checkpoint layout, three fusion steps."""
from __future__ import annotations

import dataclasses

import torch

from ...preprocess import IMAGENET_EVAL
from ..base import Detection, Family
from . import fusion
from .config import ALIASES, VARIANTS, LightViTConfig, get_config
from .layouts import detect_variant, with_own_index_tables
from .model import LightViT, count_flops


class LightViTFamily(Family):
    name = "lightvit"
    title = "LightViT (Huang et al. 2022)"
    variants = VARIANTS
    aliases = ALIASES
    fixed_size_reason = ("its 7x7 attention windows have no padding, so the token grid must be a multiple of 7 "
                         "at every stage (28, 14, 7 at 224), and the official code freezes that grid")
    # lib/dataset/transform.py build_val_transforms with configs/strategies/lightvit/config.yaml: resize the
    # shorter side to 256 (bicubic), centre-crop 224, ImageNet mean/std
    specs = {"official": dataclasses.replace(IMAGENET_EVAL, source="official")}
    deploy_stage = "deploy model"
    random_std = {"relative_position_bias_table": 1.0, "global_token": 1.0}
    model_class = LightViT  # the fusion steps leave it deploy-ready: no BatchNorm, no index tables, no affine
    make_config = staticmethod(get_config)
    steps = fusion.STEPS
    flops = staticmethod(count_flops)
    locate_units = ("patch_embed", "stages.*.*", "norm", "neck", "head")

    def detect(self, sd: dict[str, torch.Tensor]) -> Detection:
        config = detect_variant(sd)
        fixed, differed = with_own_index_tables(sd, config.window)
        notes = [f"{len(differed)} relative_position_index tables differed from the 7x7 window's (an EMA blends "
                 f"integer buffers too) and were recomputed"] if differed else []
        return Detection("official", config, {"global_tokens": config.num_tokens}, notes=notes, state=fixed)

    def describe(self, config: LightViTConfig) -> dict:
        return {"global_tokens": config.num_tokens}


FAMILY = LightViTFamily()
