"""Turn a reference model into its deploy form, one transform at a time, checking parity after each.

The steps come from the model's family (each swaps one kind of module for its fused form), so a
wrong fold is caught at the step that made it rather than at the end of an export. Every step is
judged by the fp32 parity rule against the model's reference set.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .families import family_of
from .parity import ParityReport, compare
from .reference import ReferenceSet, build_reference_set


class FusionError(RuntimeError):
    """A fusion step changed the model's output beyond what the parity rule allows in fp32."""

    def __init__(self, report: ParityReport):
        super().__init__(f"fusion step '{report.stage}' broke parity: {report.summary()}")
        self.report = report


@dataclass
class FusionResult:
    model: nn.Module
    reports: list[ParityReport]


def fuse_checked(model: nn.Module, reference: ReferenceSet | None = None, check: bool = True) -> FusionResult:
    """Fuse a copy of ``model`` step by step; with ``check``, judge each step against ``reference``.

    ``reference``: the model's reference set (built from the default parity inputs when None). Raises
    FusionError at the first step that breaks the fp32 parity rule.
    """
    family = family_of(model)
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

    for name, step in family.fusion_steps():
        step(work)
        checked(work, name)
    deploy = family.assemble(work).eval()
    checked(deploy, family.deploy_stage)
    verify_clean(deploy)
    return FusionResult(deploy, reports)


def fuse(model: nn.Module, check: bool = True) -> nn.Module:
    """The deploy form of ``model`` (no BatchNorm, no index tensors, folded constants). See fuse_checked."""
    return fuse_checked(model, check=check).model


def verify_clean(model: nn.Module) -> None:
    """The contract of every deploy model: no BatchNorm modules and no integer tensors anywhere."""
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    ints = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if not torch.is_floating_point(t)]
    if bns or ints:
        raise AssertionError(f"{type(model).__name__} still has BatchNorm {bns[:3]} / integer tensors {ints[:3]}")
