"""LITv2's fusion steps: each DTM's BatchNorm into its deformable convolution, the attention scale into the
queries (l_q and the q rows of h_qkv), and every LayerNorm affine that feeds only linears folded into them
(norm1 -> l_q, l_kv (through the average pool, which is linear) and h_qkv; norm2 -> fc1; the final norm ->
the head, through the token mean). The patch embedding's LayerNorm feeds the residual stream and keeps its
affine."""
from __future__ import annotations

from ..base import FusionStep, replace_modules
from .model import DTM, Block, ConvFFNBlock, HiLo, LITv2


def fold_layer_norms(model: LITv2) -> int:
    blocks = [m for m in model.modules() if isinstance(m, (Block, ConvFFNBlock))]
    for block in blocks:
        block.fold_norms()
    model.fold_final_norm()
    return len(blocks) + 1


STEPS: list[FusionStep] = [
    ("fold BatchNorm into the deformable convolutions", lambda m: replace_modules(m, DTM, lambda d: d.fuse())),
    ("fold attention scale into queries", lambda m: replace_modules(m, HiLo, lambda a: a.fuse())),
    ("fold LayerNorm affine into the following linears", fold_layer_norms),
]
