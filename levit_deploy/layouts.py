"""Key names of the three real checkpoint layouts, derived from a variant's config.

A LeViT state dict is a list of *units*: a conv+BN or linear+BN pair, an attention-bias table, or a
BN+linear head. Each unit has one canonical prefix (our module path) and one prefix per layout; the
suffixes inside a unit differ per layout too. Everything here is pure naming: no tensors.

Layouts (see docs/formats.md):
- ``official``: facebookresearch/LeViT ``levit.py`` (``patch_embed.0.c.weight``, ``blocks.{j}.m.qkv``)
- ``official_fused``: the same after ``utils.replace_batchnorm`` (``patch_embed.0.weight/bias``)
- ``timm``: ``stem.conv1.linear.weight``, ``stages.{s}.blocks.{b}.attn.qkv``; conv mode uses the same names
- ``hf``: transformers ``LevitForImageClassificationWithTeacher`` (``levit.patch_embeddings...``)
"""
from __future__ import annotations

from dataclasses import dataclass

from .models.config import LevitConfig

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
