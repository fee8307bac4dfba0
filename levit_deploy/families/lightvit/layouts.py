"""LightViT checkpoints: the official layout (hunto's CheckpointManager saves the model's own state_dict,
under 'model', 'ema_model' or 'state_dict'; the loader unwraps those), recognised by key names, the
variant read from tensor shapes."""
from __future__ import annotations

import re

import torch

from ..base import NotRecognised, match_classifier
from .config import VARIANTS, LightViTConfig, get_config
from .model import LightViT, relative_position_index

SIGNATURE = ("global_token", "patch_embed.stem.0.weight", "patch_embed.proj.weight")


def detect_variant(sd: dict[str, torch.Tensor]) -> LightViTConfig:
    """The config whose shapes the tensors fit exactly; NotRecognised if these are not LightViT keys."""
    if not all(k in sd for k in SIGNATURE):
        raise NotRecognised(f"LightViT (keys {', '.join(SIGNATURE)})")
    return match_classifier(sd, "LightViT", LightViT, get_config, VARIANTS, "backbone-only checkpoint")

def with_own_index_tables(sd: dict[str, torch.Tensor], window: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict with every relative_position_index replaced by the one computed here, and the keys
    whose stored table differed (an EMA blends integer buffers too and can corrupt them)."""
    own = relative_position_index(window)
    out, differed = dict(sd), []
    for key in sd:
        if re.search(r"relative_position_index$", key):
            if not torch.equal(sd[key].long(), own):
                differed.append(key)
            out[key] = own.clone()
    return out, differed
