"""Turn the reference Levit into DeployLevit, one transform at a time, checking parity after each.

Each step swaps one kind of module for its fused form (the modules' own ``fuse()``), so a wrong
fold is caught at the step that made it rather than at the end of an export.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .models.deploy import DeployHead, DeployLevit, DeployMlp, Residual
from .models.levit import Attention, AttentionSubsample, ConvNorm, Levit, LinearNorm, NormLinear, as_linear
from .parity import ParityReport, ReferenceSet, build_reference_set, compare


class FusionError(RuntimeError):
    """A fusion step changed the model's output beyond what the parity rule allows in fp32."""

    def __init__(self, report: ParityReport):
        super().__init__(f"fusion step '{report.stage}' broke parity: {report.summary()}")
        self.report = report


def _replace(model: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of type ``kind`` in place; returns how many were replaced."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, kind):
            setattr(model, name, make(child))
            count += 1
        else:
            count += _replace(child, kind, make)
    return count


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


STEPS: list[tuple[str, Callable[[Levit], int]]] = [
    ("fold BatchNorm into stem convolutions", lambda m: _replace(m, ConvNorm, lambda c: c.fuse())),
    ("fold BatchNorm into block linears", lambda m: _replace(m, LinearNorm, lambda c: c.fuse())),
    ("precompute attention-bias tables, fold scale into queries",
     lambda m: _replace(m, (Attention, AttentionSubsample), lambda c: c.fuse())),
    ("fold head BatchNorm, merge classifier and distillation heads", _merge_heads),
]


def _assemble(model: Levit) -> DeployLevit:
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


@dataclass
class FusionResult:
    model: DeployLevit
    reports: list[ParityReport]


def fuse_checked(model: Levit, reference: ReferenceSet | None = None, check: bool = True) -> FusionResult:
    """Fuse a copy of ``model`` step by step; with ``check``, judge each step against ``reference``.

    ``reference``: the model's reference set (built from the default parity inputs when None). Each
    step is held to the fp32 parity rule; raises FusionError at the first step that breaks it.
    """
    if not isinstance(model, Levit):
        raise TypeError(f"fuse() takes the reference Levit, got {type(model).__name__}")
    work = copy.deepcopy(model).float().cpu().eval()
    if check and reference is None:
        reference = build_reference_set(model)
    reports: list[ParityReport] = []

    def checked(candidate: nn.Module, stage: str) -> None:
        if check:
            report = compare(reference, candidate, "fp32", stage=stage)
            reports.append(report)
            if not report.passed:
                raise FusionError(report)

    for name, step in STEPS:
        step(work)
        checked(work, name)
    deploy = _assemble(work).eval()
    checked(deploy, "DeployLevit")
    _verify_clean(deploy)
    return FusionResult(deploy, reports)


def fuse(model: Levit, check: bool = True) -> DeployLevit:
    """The deploy form of ``model``: no BatchNorm, no index tensors, one head. See fuse_checked."""
    return fuse_checked(model, check=check).model


def _verify_clean(model: DeployLevit) -> None:
    """The contract of DeployLevit: no BatchNorm modules and no integer tensors anywhere."""
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    ints = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if not torch.is_floating_point(t)]
    if bns or ints:
        raise AssertionError(f"DeployLevit still has BatchNorm {bns[:3]} / integer tensors {ints[:3]}")
