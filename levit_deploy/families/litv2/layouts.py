"""LITv2 checkpoints: the official layout (``utils.save_checkpoint`` stores the model's own state_dict under
'model', beside optimizer, lr_scheduler, max_accuracy, epoch, a pickled yacs ``config`` and apex ``amp``
state; the loader unwraps that and reads the rest as data), recognised by key names, the variant read from
tensor shapes. The official loader uses strict=False and so accepts partial files silently; ours loads
strictly and names what is missing."""
from __future__ import annotations

import torch

from ..base import NotRecognised, match_classifier
from .config import VARIANTS, LITv2Config, get_config
from .model import LITv2

SIGNATURE = ("patch_embed.proj.weight", "layers.0.downsample.dconv.conv_offset.weight")


def detect_variant(sd: dict[str, torch.Tensor]) -> LITv2Config:
    """The config whose shapes the tensors fit exactly; NotRecognised if these are not LITv2 keys."""
    if not all(k in sd for k in SIGNATURE):
        closeness = sum(k.startswith("layers.") for k in sd) / max(len(sd), 1)
        raise NotRecognised(f"LITv2 (keys {', '.join(SIGNATURE)})", closeness if "dconv" in str(list(sd)) else 0.0)
    return match_classifier(sd, "LITv2", LITv2, get_config, VARIANTS,
                            "backbone-only checkpoint (detection or segmentation)")
