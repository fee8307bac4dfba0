"""LeViT (Graham et al. 2021): five variants, the official / timm / Hugging Face layouts, four fusion steps."""
from __future__ import annotations

import dataclasses
import math

import torch

from ...preprocess import IMAGENET_EVAL
from ..base import Detection, Family
from . import fusion
from .config import ALIASES, VARIANTS, LevitConfig, get_config, resolve_variant_name
from .layouts import check_bias_idxs, detect_variant, flatten_conv_mode, to_canonical
from .model import Levit, count_flops


class LevitFamily(Family):
    name = "levit"
    title = "LeViT (Graham et al. 2021)"
    variants = VARIANTS
    aliases = ALIASES
    fixed_size_reason = ("its attention-bias index tables are built for the 14x14 token grid of a 224x224 "
                         "input")
    specs = {
        "official": dataclasses.replace(IMAGENET_EVAL, source="official"),
        "hf": dataclasses.replace(IMAGENET_EVAL, source="hf"),
        "timm": dataclasses.replace(IMAGENET_EVAL, resize=math.floor(224 / 0.9), source="timm"),  # crop 0.9
    }
    # Official release files (facebookresearch/LeViT README); the suffix is the sha256 prefix.
    pretrained_urls = {
        "levit_128s": "https://dl.fbaipublicfiles.com/LeViT/LeViT-128S-96703c44.pth",
        "levit_128": "https://dl.fbaipublicfiles.com/LeViT/LeViT-128-b88c2750.pth",
        "levit_192": "https://dl.fbaipublicfiles.com/LeViT/LeViT-192-92712e41.pth",
        "levit_256": "https://dl.fbaipublicfiles.com/LeViT/LeViT-256-13b5763e.pth",
        "levit_384": "https://dl.fbaipublicfiles.com/LeViT/LeViT-384-9bdaf2e2.pth",
    }
    deploy_stage = "DeployLevit"
    random_std = {"attention_biases": 2.0}  # the bias then matters as much as q·k, as in trained LeViTs
    model_class = Levit
    steps = fusion.STEPS
    flops = staticmethod(count_flops)
    locate_units = ("stem", "stages.*", "head")

    def resolve(self, name: str) -> str | None:
        return resolve_variant_name(name)

    def config(self, variant: str, num_classes: int | None = None, distilled: bool | None = None) -> LevitConfig:
        return get_config(variant, num_classes, distilled)

    def detect(self, sd: dict[str, torch.Tensor]) -> Detection:
        flat, mode = flatten_conv_mode(sd)
        layout, prefix, config = detect_variant(flat)
        ignored = sorted(k for k in flat if k.endswith("attention_bias_idxs"))
        notes = [f"{len(ignored)} attention_bias_idxs tables checked and recomputed, not loaded"] if ignored else []
        if layout == "official_fused":
            notes.append("already-fused checkpoint: BatchNorm set to identity-plus-bias")
        details = {"mode": mode, "fused": layout == "official_fused", "distilled": config.distilled}
        return Detection(layout, config, details, ignored, notes, state=(flat, prefix))

    def build(self, sd: dict[str, torch.Tensor], detection: Detection) -> Levit:
        flat, prefix = detection.state
        model = Levit(detection.config)
        check_bias_idxs(flat, model, detection.layout, prefix)
        model.load_state_dict(to_canonical(flat, detection.layout, detection.config, prefix), strict=True)
        return model.eval()

    def spec_for_layout(self, layout: str):
        return self.specs.get("official" if layout.startswith("official") else layout, self.specs["official"])

    def assemble(self, model: Levit):
        return fusion.assemble(model)

    def describe(self, config: LevitConfig) -> dict:
        return {"distilled": config.distilled,
                "output": "mean of classifier and distillation heads" if config.distilled else "classifier"}


FAMILY = LevitFamily()
