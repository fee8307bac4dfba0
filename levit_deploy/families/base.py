"""What a model family is: the one small interface each family folder implements, and helpers they share.

A family owns its variants (configs), its reference model (the module tree and state_dict keys of its
official code, so official checkpoints load strictly), the checkpoint layouts it understands and how
to recognise them, its checked fusion steps, its eval preprocessing and its FLOP count. Nothing
outside a family's folder knows any of that; the rest of the package talks to :class:`Family`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..preprocess import PreprocessSpec

FusionStep = tuple[str, Callable[[nn.Module], int]]


class CheckpointMismatch(Exception):
    """This family's checkpoint, but not usable (wrong shapes, missing keys, another resolution...); the
    loader adds the file name and raises it as a CheckpointError."""


class NotRecognised(Exception):
    """A state dict is not of this family; ``closeness`` ranks how near it came (for error messages)."""

    def __init__(self, message: str, closeness: float = 0.0):
        super().__init__(message)
        self.closeness = closeness


@dataclass
class Detection:
    """What a family recognised in a state dict: enough to build and describe the model."""

    layout: str
    config: Any
    details: dict = field(default_factory=dict)  # family facts shown by `info` (mode, fused, distilled, ...)
    ignored_keys: list[str] = field(default_factory=list)  # present, checked, not loaded
    notes: list[str] = field(default_factory=list)
    state: Any = None  # whatever build() needs from detection (e.g. a key prefix)


class Family(ABC):
    """One model family. Subclasses fill in the class attributes and implement the abstract methods."""

    name: str  # "levit"
    title: str  # "LeViT (Graham et al. 2021)"
    variants: dict[str, Any]  # canonical variant name -> config
    aliases: dict[str, str] = {}  # other spellings users type -> canonical name
    specs: dict[str, PreprocessSpec]  # named eval transforms; "official" is the family's own
    pretrained_urls: dict[str, str] = {}  # variant -> download URL (sha256 prefix in the file name)
    deploy_stage: str = "deploy model"  # name of the last fusion check
    #: parameters (by name) that random init draws with their own standard deviation
    random_std: dict[str, float] = {}
    model_class: type[nn.Module]  # the reference model, built from a config
    make_config: Callable[..., Any]  # staticmethod (variant, num_classes) -> config
    steps: list[FusionStep]  # the fusion steps, in order
    flops: Callable[[Any], int]  # staticmethod config -> multiply-adds per image
    #: the deployed model's chain of units for --locate, as module-path patterns ("stages.*": each stage)
    locate_units: tuple[str, ...] = ()

    # --- variants -------------------------------------------------------------------------------------
    def resolve(self, name: str) -> str | None:
        """The canonical variant for a user-typed name, or None if it is not one of this family's."""
        if name in self.variants:
            return name
        if name in self.aliases:
            return self.aliases[name]
        lowered = name.lower().replace("-", "_")
        return lowered if lowered in self.variants else None

    def config(self, variant: str, num_classes: int | None = None) -> Any:
        return self.make_config(variant, num_classes)

    def create(self, config: Any) -> nn.Module:
        """A freshly initialised reference model (eval mode) for ``config``."""
        return self.model_class(config).eval()

    # --- checkpoints ----------------------------------------------------------------------------------
    @abstractmethod
    def detect(self, sd: dict[str, torch.Tensor]) -> Detection:
        """Recognise layout and variant from key names and shapes; NotRecognised if not this family,
        CheckpointMismatch if it is this family but the tensors do not fit."""

    def build(self, sd: dict[str, torch.Tensor], detection: Detection) -> nn.Module:
        """The reference model with the checkpoint loaded strictly, in eval mode: ``detection.state`` when detect
        prepared the tensors, else ``sd`` as it is."""
        model = self.model_class(detection.config)
        model.load_state_dict(sd if detection.state is None else detection.state, strict=True)
        return model.eval()

    # --- fusion and export ----------------------------------------------------------------------------
    def fusion_steps(self) -> list[FusionStep]:
        """Named in-place transforms of a copy of the reference model, each checked for parity."""
        return self.steps

    def assemble(self, model: nn.Module) -> nn.Module:
        """The fully transformed reference model repackaged as the deploy model every exporter sees (by default
        the steps leave it deploy-ready)."""
        return model

    #: why only the configured input size runs (shown when another is asked for)
    fixed_size_reason: str = ""

    def input_size_error(self, config: Any, size: int) -> str | None:
        """Why ``size`` cannot run (None if it can): only the configured size runs."""
        if size == config.img_size:
            return None
        reason = f": {self.fixed_size_reason}" if self.fixed_size_reason else ""
        return (f"{config.name} runs at {config.img_size}x{config.img_size} only, not {size}x{size}{reason}; only "
                f"the batch axis may be dynamic")

    def describe(self, config: Any) -> dict:
        """Facts about the model for the manifest beyond variant, classes, params and FLOPs."""
        return {}

    def choose_for_target(self, model: nn.Module, target: str, precision: str, options: Any) -> dict:
        """Set the deploy model up for export to ``target`` (in ``precision``, with the target's ``options``)
        where the family has equivalent implementations of an op (e.g. LITv2's deformable-conv sampler);
        returns the choices, recorded in the manifest."""
        return {}

    def count_flops(self, config: Any) -> int:
        """Multiply-adds per image, counted the way the family's paper counts them."""
        return self.flops(config)

    # --- preprocessing --------------------------------------------------------------------------------
    def spec_for_layout(self, layout: str) -> PreprocessSpec:
        """The eval transform of checkpoints of ``layout`` (the family's own for random init)."""
        return self.specs.get(layout, self.specs["official"])

    # --- random init ----------------------------------------------------------------------------------
    def randomize_(self, model: nn.Module, seed: int = 0) -> nn.Module:
        """Seeded random weights, normalisation statistics and affine terms, in place.

        Default init leaves BatchNorm and LayerNorm at identity and biases at zero, which hides fusion
        and layout bugs, so ``--init random`` and the tests use this instead. It goes by module type and
        parameter name, so it randomises the family's independent test implementations alike.
        """
        gen = torch.Generator().manual_seed(seed)

        def randn(t: torch.Tensor) -> torch.Tensor:
            return torch.randn(t.shape, generator=gen)

        def rand(t: torch.Tensor) -> torch.Tensor:
            return torch.rand(t.shape, generator=gen)

        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.weight.copy_(rand(module.weight) + 0.25)
                    module.bias.copy_(randn(module.bias) * 0.1)
                    module.running_mean.copy_(randn(module.running_mean) * 0.1)
                    module.running_var.copy_(rand(module.running_var) * 1.5 + 0.5)
                    continue
                if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                    module.weight.copy_(rand(module.weight) + 0.5)
                    module.bias.copy_(randn(module.bias) * 0.1)
                    continue
                for name, p in module.named_parameters(recurse=False):
                    if name in self.random_std:
                        p.copy_(randn(p) * self.random_std[name])
                    elif name == "bias":
                        p.copy_(randn(p) * 0.1)
                    else:
                        p.copy_(randn(p) * p[0].numel() ** -0.5)
        return model


# --- helpers the families share ------------------------------------------------------------------------

def replace_modules(model: nn.Module, kind: type | tuple[type, ...], make: Callable[[nn.Module], nn.Module]) -> int:
    """Replace every submodule of type ``kind`` in place by ``make(module)``; returns how many were replaced."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, kind):
            setattr(model, name, make(child))
            count += 1
        else:
            count += replace_modules(child, kind, make)
    return count


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm in eval mode as y = x·scale + shift, computed in float64."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Linear:
    """An nn.Linear holding ``weight``/``bias`` (computed in float64) in the dtype and device of ``like``."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight.data = weight.to(like.dtype).contiguous()
    if bias is not None:
        out.bias.data = bias.to(like.dtype).contiguous()
    return out.to(like.device)


def fold_norm_into_linear(norm: nn.LayerNorm, linears: list[nn.Linear]) -> nn.LayerNorm:
    """Fold a LayerNorm's affine (γ, β) into the linears it feeds: W·(γ·n + β) + b = (W·γ)·n + (W·β + b).

    Returns the plain normalisation (no affine) that replaces ``norm``; each linear is updated in place.
    """
    gamma, beta = norm.weight.double(), norm.bias.double()
    with torch.no_grad():
        for lin in linears:
            w = lin.weight.double()
            b = lin.bias.double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            new_b = w @ beta + b
            lin.weight.copy_((w * gamma[None, :]).to(lin.weight.dtype))
            if lin.bias is None:
                lin.bias = nn.Parameter(new_b.to(lin.weight.dtype))
            else:
                lin.bias.copy_(new_b.to(lin.bias.dtype))
    return nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False).to(norm.weight.device)


def expected_shapes(make: Callable[[Any], nn.Module], config: Any) -> dict[str, tuple]:
    """Every state_dict key of ``make(config)`` and its shape, without allocating weights."""
    with torch.device("meta"):
        model = make(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_variant(sd: dict[str, torch.Tensor], title: str, configs: list[Any],
                  expected: Callable[[Any], dict[str, tuple]], ignorable: Callable[[str], bool] = lambda k: False
                  ) -> Any:
    """The config whose expected keys and shapes (``expected(config)``) ``sd`` has exactly (keys for which
    ``ignorable`` holds may be extra); else CheckpointMismatch naming the closest variant and its first
    mismatches. ``title``: what was recognised, e.g. "LeViT timm layout"."""
    scored = []
    for config in configs:
        shapes = expected(config)
        missing = [k for k in shapes if k not in sd]
        wrong = [f"{k}: found {tuple(sd[k].shape)}, expected {shapes[k]}" for k in shapes
                 if k in sd and tuple(sd[k].shape) != shapes[k]]
        unexpected = [k for k in sd if k not in shapes and not ignorable(k)]
        if not (missing or wrong or unexpected):
            return config
        scored.append((len(missing) + len(wrong) + len(unexpected), config.name, missing, wrong, unexpected))
    _, name, missing, wrong, unexpected = min(scored)
    problems = ([f"shape {w}" for w in wrong[:3]] + [f"missing {k}" for k in missing[:3]]
                + [f"unexpected {k}" for k in unexpected[:3]])
    raise CheckpointMismatch(
        f"{title} ({configs[0].num_classes} classes) but the tensors match no variant; closest is {name} "
        f"({len(missing)} missing, {len(wrong)} wrong shape, {len(unexpected)} unexpected keys). First "
        f"mismatches: {'; '.join(problems[:5])}")


def split_last(t: torch.Tensor, width: int, parts: int) -> tuple[torch.Tensor, ...]:
    """``t.chunk(parts, -1)`` as plain slices of ``width`` channels. torch.onnx's dynamo exporter writes a
    chunk as SplitToSequence + SequenceAt, which ONNX Runtime runs as copies into a tensor sequence; slices
    stay Slice ops it fuses (LightViT-S, batch 16, 1 thread: the whole model ran 1.26x slower with chunks)."""
    return tuple(t[..., i * width:(i + 1) * width] for i in range(parts))


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (buffers such as index tables and running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def match_classifier(sd: dict[str, torch.Tensor], family: str, model_class: type, get_config: Callable[..., Any],
                     variants: Any, backbone: str) -> Any:
    """The variant config of a classifier checkpoint in a family's official layout: the head gives the class
    count, the shapes the variant (``match_variant``); a checkpoint without a head (``backbone``: what such
    files usually are) is refused, as it cannot be deployed as a classifier."""
    if "head.weight" not in sd:
        raise CheckpointMismatch(f"{family} checkpoint without a classification head (no 'head.weight'); a "
                                 f"{backbone} cannot be deployed as a classifier")
    num_classes = int(sd["head.weight"].shape[0])
    return match_variant(sd, f"{family} official layout", [get_config(n, num_classes) for n in variants],
                         lambda config: expected_shapes(model_class, config))
