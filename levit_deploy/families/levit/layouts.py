"""LeViT checkpoint layouts: key names derived from a variant's config, detection, conversion.

A LeViT state dict is a list of *units*: a conv+BN or linear+BN pair, an attention-bias table, or a
BN+linear head. Each unit has one canonical prefix (our module path) and one prefix per layout; the
suffixes inside a unit differ per layout too. Detection finds the layout from one stem key and the
variant, class count and mode (linear or 1x1-conv) from tensor shapes; conversion renames a layout's
tensors into our module names (and back, for writing checkpoints as each layout's own code saves them).

Layouts (see docs/formats.md):
- ``official``: facebookresearch/LeViT ``levit.py`` (``patch_embed.0.c.weight``, ``blocks.{j}.m.qkv``)
- ``official_fused``: the same after ``utils.replace_batchnorm`` (``patch_embed.0.weight/bias``)
- ``timm``: ``stem.conv1.linear.weight``, ``stages.{s}.blocks.{b}.attn.qkv``; conv mode uses the same names
- ``hf``: transformers ``LevitForImageClassificationWithTeacher`` (``levit.patch_embeddings...``)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import CheckpointMismatch, NotRecognised, match_variant
from .config import VARIANTS, LevitConfig, get_config
from .model import Levit, attention_bias_idxs

BN_EPS = 1e-5

BN_STATS = ("weight", "bias", "running_mean", "running_var")
BN_COUNTER = "num_batches_tracked"


@dataclass(frozen=True)
class Unit:
    kind: str  # "conv_bn" | "linear_bn" | "bias_table" | "head"
    canonical: str
    official: str
    timm: str
    hf: str

    def prefix(self, layout: str) -> str:
        return getattr(self, "official" if layout == "official_fused" else layout)


def units(config: LevitConfig) -> list[Unit]:
    """Every unit of a model in forward order, with its prefix in each layout."""
    out: list[Unit] = []
    for i in range(4):
        out.append(Unit("conv_bn", f"stem.convs.{i}", f"patch_embed.{2 * i}", f"stem.conv{i + 1}",
                        f"levit.patch_embeddings.embedding_layer_{i + 1}"))
    j = 0  # global block index of the official layout
    for s in range(3):
        if s > 0:
            c = f"stages.{s}.downsample"
            t = f"stages.{s}.downsample"
            h = f"levit.encoder.stages.{s - 1}.layers.{2 * config.depths[s - 1]}"
            h_mlp = f"levit.encoder.stages.{s - 1}.layers.{2 * config.depths[s - 1] + 1}.module"
            out += [
                Unit("bias_table", f"{c}.attn", f"blocks.{j}", f"{t}.attn_downsample", h),
                Unit("linear_bn", f"{c}.attn.kv", f"blocks.{j}.kv", f"{t}.attn_downsample.kv",
                     f"{h}.keys_values"),
                Unit("linear_bn", f"{c}.attn.q", f"blocks.{j}.q.1", f"{t}.attn_downsample.q.ln",
                     f"{h}.queries"),
                Unit("linear_bn", f"{c}.attn.proj", f"blocks.{j}.proj.1", f"{t}.attn_downsample.proj.ln",
                     f"{h}.projection"),
                Unit("linear_bn", f"{c}.mlp.up", f"blocks.{j + 1}.m.0", f"{t}.mlp.ln1", f"{h_mlp}.linear_up"),
                Unit("linear_bn", f"{c}.mlp.down", f"blocks.{j + 1}.m.2", f"{t}.mlp.ln2",
                     f"{h_mlp}.linear_down"),
            ]
            j += 2
        for b in range(config.depths[s]):
            c = f"stages.{s}.blocks.{b}"
            h = f"levit.encoder.stages.{s}.layers"
            out += [
                Unit("bias_table", f"{c}.attn", f"blocks.{j}.m", f"{c}.attn", f"{h}.{2 * b}.module"),
                Unit("linear_bn", f"{c}.attn.qkv", f"blocks.{j}.m.qkv", f"{c}.attn.qkv",
                     f"{h}.{2 * b}.module.queries_keys_values"),
                Unit("linear_bn", f"{c}.attn.proj", f"blocks.{j}.m.proj.1", f"{c}.attn.proj.ln",
                     f"{h}.{2 * b}.module.projection"),
                Unit("linear_bn", f"{c}.mlp.up", f"blocks.{j + 1}.m.0", f"{c}.mlp.ln1",
                     f"{h}.{2 * b + 1}.module.linear_up"),
                Unit("linear_bn", f"{c}.mlp.down", f"blocks.{j + 1}.m.2", f"{c}.mlp.ln2",
                     f"{h}.{2 * b + 1}.module.linear_down"),
            ]
            j += 2
    out.append(Unit("head", "head", "head", "head", "classifier"))
    if config.distilled:
        out.append(Unit("head", "head_dist", "head_dist", "head_dist", "classifier_distill"))
    return out


def unit_suffixes(kind: str, layout: str) -> dict[str, str]:
    """canonical suffix -> layout suffix inside one unit (num_batches_tracked handled separately)."""
    if kind == "bias_table":
        return {"attention_biases": "attention_biases"}
    if layout == "official_fused":
        if kind == "head":
            return {"linear.weight": "weight", "linear.bias": "bias"}
        return {"weight": "weight", "bias": "bias"}  # fused conv/linear: special-cased by the loader
    bn = {"official": "bn", "timm": "bn", "hf": "batch_norm"}[layout]
    mapping = {f"bn.{stat}": f"{bn}.{stat}" for stat in BN_STATS}
    if kind == "head":
        lin = {"official": "l", "timm": "linear", "hf": "linear"}[layout]
        mapping.update({"linear.weight": f"{lin}.weight", "linear.bias": f"{lin}.bias"})
    elif kind == "conv_bn":
        conv = {"official": "c", "timm": "linear", "hf": "convolution"}[layout]
        mapping["conv.weight"] = f"{conv}.weight"
    else:
        lin = {"official": "c", "timm": "linear", "hf": "linear"}[layout]
        mapping["linear.weight"] = f"{lin}.weight"
    return mapping


def bn_prefix(kind: str, layout: str) -> str | None:
    """Prefix (inside the unit) of the BatchNorm whose num_batches_tracked a layout may carry."""
    if kind == "bias_table" or layout == "official_fused":
        return None
    return "batch_norm" if layout == "hf" else "bn"


# One key that only one layout has: the first stem convolution's weight.
SIGNATURES = {
    "official": "patch_embed.0.c.weight",
    "official_fused": "patch_embed.0.weight",
    "timm": "stem.conv1.linear.weight",
    "hf": "patch_embeddings.embedding_layer_1.convolution.weight",
}


def detect_layout(sd: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(layout, key prefix). The prefix is '' except for Hugging Face's optional 'levit.'."""
    for layout in ("official", "official_fused", "timm"):
        if SIGNATURES[layout] in sd:
            return layout, ""
    sig = SIGNATURES["hf"]
    for key in sd:
        if key.endswith(sig):
            return "hf", key[: -len(sig)]
    expected = "; ".join(f"{name}: {key}" for name, key in SIGNATURES.items())
    raise NotRecognised(f"LeViT (a stem key of a layout: {expected})")


def _hf_key(unit_prefix: str, hf_prefix: str) -> str:
    """Hugging Face keys: 'levit.' is the model prefix, which LevitModel checkpoints do not have."""
    return hf_prefix + unit_prefix[len("levit."):] if unit_prefix.startswith("levit.") else unit_prefix


def _layout_key(unit: Unit, suffix: str, layout: str, hf_prefix: str) -> str:
    prefix = unit.prefix(layout)
    if layout == "hf":
        prefix = _hf_key(prefix, hf_prefix)
    return f"{prefix}.{suffix}"


def expected_shapes(config: LevitConfig, layout: str, hf_prefix: str = "") -> dict[str, tuple]:
    """Layout key -> shape for a config (linear mode), used to detect variants and explain mismatches."""
    with torch.device("meta"):
        model = Levit(config)
    canonical = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes: dict[str, tuple] = {}
    for unit in units(config):
        for csuf, lsuf in unit_suffixes(unit.kind, layout).items():
            key = _layout_key(unit, lsuf, layout, hf_prefix)
            if layout == "official_fused" and unit.kind in ("conv_bn", "linear_bn"):
                wkey = f"{unit.canonical}.{'conv' if unit.kind == 'conv_bn' else 'linear'}.weight"
                shapes[key] = canonical[wkey] if csuf == "weight" else (canonical[wkey][0],)
            else:
                shapes[key] = canonical[f"{unit.canonical}.{csuf}"]
    return shapes


def _head_shape(sd: dict[str, torch.Tensor], layout: str) -> tuple[int, bool]:
    names = {"official": ("head.l.weight", "head_dist.l.weight"),
             "official_fused": ("head.weight", "head_dist.weight"),
             "timm": ("head.linear.weight", "head_dist.linear.weight"),
             "hf": ("classifier.linear.weight", "classifier_distill.linear.weight")}[layout]
    if names[0] not in sd:
        raise CheckpointMismatch(f"LeViT {layout} layout without a classification head (no {names[0]!r}); "
                                 f"a backbone-only checkpoint cannot be deployed as a classifier")
    return int(sd[names[0]].shape[0]), names[1] in sd


def flatten_conv_mode(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict, mode): levit_conv_* checkpoints store block linears as [out, in, 1, 1]; flatten them.

    The stem convolutions are 3x3, so the 1x1 shape alone identifies conv-mode block weights.
    """
    if not any(v.dim() == 4 and v.shape[2:] == (1, 1) for v in sd.values()):
        return sd, "linear"
    return {k: (v.flatten(1) if v.dim() == 4 and v.shape[2:] == (1, 1) else v) for k, v in sd.items()}, "conv"


def _ignorable(key: str) -> bool:
    return key.endswith(("attention_bias_idxs", BN_COUNTER))


def detect_variant(sd: dict[str, torch.Tensor]) -> tuple[str, str, LevitConfig]:
    """(layout, hf_prefix, config) of a linear-mode state dict; CheckpointMismatch if no variant fits."""
    layout, hf_prefix = detect_layout(sd)
    num_classes, distilled = _head_shape(sd, layout)
    config = match_variant(sd, f"LeViT {layout} layout", [get_config(n, num_classes, distilled) for n in VARIANTS],
                           lambda c: expected_shapes(c, layout, hf_prefix), _ignorable)
    return layout, hf_prefix, config


# ---------------------------------------------------------------------------------------------
# Conversion into the canonical model


def identity_bn(bias: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """BatchNorm that only adds ``bias``: how a fused official checkpoint maps onto the reference."""
    n = bias.shape[0]
    return {f"{prefix}.bn.weight": torch.ones(n), f"{prefix}.bn.bias": bias.clone(),
            f"{prefix}.bn.running_mean": torch.zeros(n),
            f"{prefix}.bn.running_var": torch.full((n,), 1.0 - BN_EPS)}


def to_canonical(sd: dict[str, torch.Tensor], layout: str, config: LevitConfig, hf_prefix: str = "",
                 ) -> dict[str, torch.Tensor]:
    """Rename (and, for fused checkpoints, un-fold) a layout's tensors into our module names."""
    out: dict[str, torch.Tensor] = {}
    for unit in units(config):
        for csuf, lsuf in unit_suffixes(unit.kind, layout).items():
            tensor = sd[_layout_key(unit, lsuf, layout, hf_prefix)].float()
            if layout == "official_fused" and unit.kind in ("conv_bn", "linear_bn"):
                inner = "conv" if unit.kind == "conv_bn" else "linear"
                if csuf == "weight":
                    out[f"{unit.canonical}.{inner}.weight"] = tensor
                else:
                    out.update(identity_bn(tensor, unit.canonical))
            else:
                out[f"{unit.canonical}.{csuf}"] = tensor
        if layout == "official_fused" and unit.kind == "head":  # BN already folded into the linear
            out.update(identity_bn(torch.zeros(out[f"{unit.canonical}.linear.weight"].shape[1]), unit.canonical))
        if unit.kind != "bias_table":
            out[f"{unit.canonical}.bn.{BN_COUNTER}"] = torch.tensor(0, dtype=torch.long)
    return out


def from_canonical(canonical: dict[str, torch.Tensor], layout: str, config: LevitConfig,
                   mode: str = "linear") -> dict[str, torch.Tensor]:
    """Our state dict written in another layout (unfused layouts only), as that layout's own code saves it."""
    if layout not in ("official", "timm", "hf"):
        raise ValueError(f"cannot write layout {layout!r}; choose official, timm or hf")
    out: dict[str, torch.Tensor] = {}
    for unit in units(config):
        for csuf, lsuf in unit_suffixes(unit.kind, layout).items():
            tensor = canonical[f"{unit.canonical}.{csuf}"]
            if mode == "conv" and unit.kind == "linear_bn" and csuf == "linear.weight":
                tensor = tensor[:, :, None, None]
            out[_layout_key(unit, lsuf, layout, "levit.")] = tensor.clone()
        bn = bn_prefix(unit.kind, layout)
        if bn is not None:
            out[_layout_key(unit, f"{bn}.{BN_COUNTER}", layout, "levit.")] = torch.tensor(0)
        if layout == "official" and unit.kind == "bias_table":
            stride = 2 if ".downsample." in unit.canonical else 1
            s = int(unit.canonical.split(".")[1])
            res = config.resolutions[s - 1] if stride == 2 else config.resolutions[s]
            out[f"{unit.official}.attention_bias_idxs"] = attention_bias_idxs(res, stride)
    return out


def check_bias_idxs(sd: dict[str, torch.Tensor], model: Levit, layout: str, hf_prefix: str) -> None:
    """Stored index tables must equal ours: a mismatch means another input resolution."""
    mods = dict(model.named_modules())
    for unit in units(model.config):
        if unit.kind != "bias_table":
            continue
        key = _layout_key(unit, "attention_bias_idxs", layout, hf_prefix)
        if key in sd and not torch.equal(sd[key].long(), mods[unit.canonical].attention_bias_idxs):
            raise CheckpointMismatch(f"{key}: the stored attention-bias index table differs from the one for "
                                  f"{model.config.img_size}x{model.config.img_size} input; this checkpoint "
                                  f"was built for another resolution, which levit-deploy does not support")
