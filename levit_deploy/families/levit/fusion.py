"""LeViT's fusion steps: BatchNorm into convolutions and linears, bias tables into constants, the
attention scale into the queries, the head BatchNorms into the heads and the two heads into one."""
from __future__ import annotations

from torch import nn

from ..base import FusionStep, replace_modules
from .deploy import DeployHead, DeployLevit, DeployMlp, Residual
from .model import Attention, AttentionSubsample, ConvNorm, Levit, LinearNorm, NormLinear, as_linear


def _merge_heads(model: Levit) -> int:
    """Fold the head BatchNorms into their linears and average the two heads into one linear."""
    head = model.head.fuse() if isinstance(model.head, NormLinear) else model.head
    if model.head_dist is not None:
        dist = model.head_dist.fuse()
        merged = nn.Linear(head.in_features, head.out_features).to(head.weight)
        merged.weight.data = ((head.weight.double() + dist.weight.double()) / 2).to(head.weight.dtype)
        merged.bias.data = ((head.bias.double() + dist.bias.double()) / 2).to(head.bias.dtype)
        head, model.head_dist = merged, None
    model.head = head
    return 1


STEPS: list[FusionStep] = [
    ("fold BatchNorm into stem convolutions", lambda m: replace_modules(m, ConvNorm, lambda c: c.fuse())),
    ("fold BatchNorm into block linears", lambda m: replace_modules(m, LinearNorm, lambda c: c.fuse())),
    ("precompute attention-bias tables, fold scale into queries",
     lambda m: replace_modules(m, (Attention, AttentionSubsample), lambda c: c.fuse())),
    ("fold head BatchNorm, merge classifier and distillation heads", _merge_heads),
]


def assemble(model: Levit) -> DeployLevit:
    """Package the fully swapped reference model as the flat DeployLevit."""
    convs = list(model.stem.convs)
    stem_layers: list[nn.Module] = []
    for i, conv in enumerate(convs):
        if i:
            stem_layers.append(nn.Hardswish())
        stem_layers.append(conv)
    layers: list[nn.Module] = []
    for stage in model.stages:
        if stage.downsample is not None:
            layers.append(stage.downsample.attn)
            layers.append(Residual(DeployMlp(as_linear(stage.downsample.mlp.up), as_linear(stage.downsample.mlp.down))))
        for block in stage.blocks:
            layers.append(Residual(block.attn))
            layers.append(Residual(DeployMlp(as_linear(block.mlp.up), as_linear(block.mlp.down))))
    return DeployLevit(nn.Sequential(*stem_layers), nn.Sequential(*layers), DeployHead(model.head), model.config)
