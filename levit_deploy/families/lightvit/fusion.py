"""LightViT's fusion steps: stem BatchNorm into its convolutions, the relative-position bias gather into
constants with the attention scale in the queries, and every LayerNorm affine that feeds only linears
folded into them (norm1 -> qkv, norm2 -> fc1, the bi-attention norm -> both reduce projections, the merge
norms -> their projections, the final norm -> the neck). The stem's LayerNorm feeds the residual stream
and the neck's LayerNorm feeds GELU, so those two keep their affine."""
from __future__ import annotations

from ..base import FusionStep, replace_modules
from .model import Block, ConvStem, LightViT, LightViTAttention, ResidualMergePatch


def fold_layer_norms(model: LightViT) -> int:
    folded = 0
    for module in model.modules():
        if isinstance(module, (Block, ResidualMergePatch)):
            module.fold_norms()
            folded += 1
    model.fold_final_norm()
    return folded + 1


STEPS: list[FusionStep] = [
    ("fold BatchNorm into stem convolutions", lambda m: replace_modules(m, ConvStem, lambda s: s.fuse())),
    ("precompute relative-position bias tables, fold scale into queries",
     lambda m: replace_modules(m, LightViTAttention, lambda a: a.fuse())),
    ("fold LayerNorm affine into the following linears", fold_layer_norms),
]
