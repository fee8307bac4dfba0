"""Synthetic checkpoints in the three real layouts, built from Hugging Face's LeViT.

Hugging Face transformers is the independent reference implementation. The timm and official key
names are produced here by direct renaming written from the format notes (docs/formats.md), deliberately not
with levit_deploy's own layout tables, so a mapping mistake in the package cannot hide itself.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from levit_deploy.families import get_family

EPS = 1e-5
VARIANT_SHAPES = {
    "levit_128s": ([128, 256, 384], 16, [4, 6, 8], [2, 3, 4]),
    "levit_128": ([128, 256, 384], 16, [4, 8, 12], [4, 4, 4]),
    "levit_192": ([192, 288, 384], 32, [3, 5, 6], [4, 4, 4]),
    "levit_256": ([256, 384, 512], 32, [4, 6, 8], [4, 4, 4]),
    "levit_384": ([384, 512, 768], 32, [6, 9, 12], [4, 4, 4]),
}


def hf_model(variant: str, seed: int = 0, num_classes: int = 1000, distilled: bool = True):
    """A Hugging Face LeViT with random weights, BN statistics and attention biases, in eval mode."""
    from transformers import LevitConfig, LevitForImageClassification, LevitForImageClassificationWithTeacher

    dims, d, heads, depths = VARIANT_SHAPES[variant]
    cfg = LevitConfig(hidden_sizes=dims, num_attention_heads=heads, depths=depths, key_dim=[d] * 3,
                      num_labels=num_classes, drop_path_rate=0)
    cls = LevitForImageClassificationWithTeacher if distilled else LevitForImageClassification
    model = cls(cfg)
    get_family("levit").randomize_(model, seed)  # by module type: HF's modules get what ours get
    model.train()
    model.eval()  # clears HF's per-device bias cache
    return model


@torch.no_grad()
def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).logits


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _depths(sd: dict) -> list[int]:
    """X_s per stage: the number of attention layers under `module.queries_keys_values` per stage."""
    depths = [0, 0, 0]
    for k in sd:
        m = re.match(r"levit\.encoder\.stages\.(\d)\.layers\.(\d+)\.module\.queries_keys_values\.linear\.weight", k)
        if m:
            depths[int(m.group(1))] += 1
    return depths


def _stem(sd: dict[str, torch.Tensor], name) -> dict[str, torch.Tensor]:
    """Stem tensors renamed by name(layer 1..4, is_conv, suffix)."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"levit\.patch_embeddings\.embedding_layer_(\d)\.(convolution|batch_norm)\.(.+)", k)
        if m:
            out[name(int(m.group(1)), m.group(2) == "convolution", m.group(3))] = v
    return out


def to_timm(sd: dict[str, torch.Tensor], conv_mode: bool = False) -> dict[str, torch.Tensor]:
    depths = _depths(sd)
    out = _stem(sd, lambda i, conv, rest: f"stem.conv{i}.{'linear' if conv else 'bn'}.{rest}")
    for k, v in sd.items():
        if k.startswith("levit.patch_embeddings."):
            continue
        k2 = k.replace("batch_norm", "bn")
        m = re.match(r"levit\.encoder\.stages\.(\d)\.layers\.(\d+)\.(.+)", k2)
        if m:
            s, layer, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if layer < 2 * depths[s]:
                b = layer // 2
                rest = (rest.replace("module.queries_keys_values.", "attn.qkv.")
                        .replace("module.projection.", "attn.proj.ln.")
                        .replace("module.attention_biases", "attn.attention_biases")
                        .replace("module.linear_up.", "mlp.ln1.").replace("module.linear_down.", "mlp.ln2."))
                name = f"stages.{s}.blocks.{b}.{rest}"
            else:
                rest = (rest.replace("keys_values.", "attn_downsample.kv.")
                        .replace("queries.", "attn_downsample.q.ln.")
                        .replace("projection.", "attn_downsample.proj.ln.")
                        .replace("attention_biases", "attn_downsample.attention_biases")
                        .replace("module.linear_up.", "mlp.ln1.").replace("module.linear_down.", "mlp.ln2."))
                name = f"stages.{s + 1}.downsample.{rest}"
            if conv_mode and name.endswith("linear.weight"):
                v = v[:, :, None, None]
            out[name] = v
            continue
        k3 = k2.replace("classifier_distill.", "head_dist.").replace("classifier.", "head.")
        out[k3] = v
    return out


def bias_idxs(r_in: int, stride: int) -> torch.Tensor:
    """idx(q, k) = |y_q·stride − y_k|·r_in + |x_q·stride − x_k| (the attention-bias index of the original code)."""
    r_out = (r_in - 1) // stride + 1
    qy, qx = np.divmod(np.arange(r_out * r_out), r_out)
    ky, kx = np.divmod(np.arange(r_in * r_in), r_in)
    idx = np.abs(qy[:, None] * stride - ky[None]) * r_in + np.abs(qx[:, None] * stride - kx[None])
    return torch.from_numpy(idx.astype(np.int64))


def to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official facebookresearch key names, with the int64 attention_bias_idxs the .pth files carry."""
    depths = _depths(sd)
    res = [14, 7, 4]
    out = _stem(sd, lambda i, conv, rest: f"patch_embed.{2 * (i - 1)}.{'c' if conv else 'bn'}.{rest}")
    j = 0
    for s in range(3):
        n_layers = 2 * depths[s] + (2 if s < 2 else 0)
        for layer in range(n_layers):
            prefix = f"levit.encoder.stages.{s}.layers.{layer}."
            items = {k[len(prefix):].replace("batch_norm", "bn"): v for k, v in sd.items() if k.startswith(prefix)}
            for rest, v in items.items():
                rest = rest.replace("linear.weight", "c.weight")
                if layer < 2 * depths[s] and layer % 2 == 0:
                    rest = (rest.replace("module.queries_keys_values.", "m.qkv.")
                            .replace("module.projection.", "m.proj.1.").replace("module.attention_biases", "m.attention_biases"))
                elif layer % 2 == 1:
                    rest = rest.replace("module.linear_up.", "m.0.").replace("module.linear_down.", "m.2.")
                else:
                    rest = rest.replace("keys_values.", "kv.").replace("queries.", "q.1.").replace("projection.", "proj.1.")
                out[f"blocks.{j}.{rest}"] = v
            if layer < 2 * depths[s] and layer % 2 == 0:
                out[f"blocks.{j}.m.attention_bias_idxs"] = bias_idxs(res[s], 1)
            elif layer == 2 * depths[s]:
                out[f"blocks.{j}.attention_bias_idxs"] = bias_idxs(res[s], 2)
            j += 1
    for k, v in sd.items():
        for hf, ours in (("classifier_distill.", "head_dist."), ("classifier.", "head.")):
            if k.startswith(hf):
                out[ours + k[len(hf):].replace("batch_norm", "bn").replace("linear.", "l.")] = v
    return out


def _bn_scale_shift(sd: dict[str, torch.Tensor], bn: str) -> tuple[torch.Tensor, torch.Tensor]:
    scale = sd[f"{bn}.weight"].double() / torch.sqrt(sd[f"{bn}.running_var"].double() + EPS)
    return scale, sd[f"{bn}.bias"].double() - sd[f"{bn}.running_mean"].double() * scale


def fuse_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What facebookresearch utils.replace_batchnorm leaves: conv/linear with bias, heads as one Linear."""
    out = {k: v for k, v in sd.items() if k.endswith(("attention_biases", "attention_bias_idxs"))}
    for p in {k[: -len(".c.weight")] for k in sd if k.endswith(".c.weight")}:
        w = sd[f"{p}.c.weight"].double()
        scale, shift = _bn_scale_shift(sd, f"{p}.bn")
        out[f"{p}.weight"] = (w * scale.view(-1, *([1] * (w.dim() - 1)))).float()
        out[f"{p}.bias"] = shift.float()
    for head in ("head", "head_dist"):
        if f"{head}.l.weight" in sd:
            scale, shift = _bn_scale_shift(sd, f"{head}.bn")
            w, b = sd[f"{head}.l.weight"].double(), sd[f"{head}.l.bias"].double()
            out[f"{head}.weight"] = (w * scale[None]).float()
            out[f"{head}.bias"] = (b + w @ shift).float()
    return out


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> float:
    """max|ours − ref| <= rel · max|ref| (the issue's fp32 criterion); returns the ratio."""
    e = (ours.double() - ref.double()).abs().max().item()
    s = ref.double().abs().max().item()
    assert e <= rel * s, f"max|Δ| {e:.3g} > {rel}·{s:.3g}"
    return e / s


def write_layout(folder: Path, sd: dict[str, torch.Tensor], layout: str, fmt: str = "safetensors") -> Path:
    """Write an HF-named state dict as a real checkpoint of ``layout`` and ``fmt`` into ``folder``.

    layout: official | official_fused | timm | timm_conv | hf; fmt: safetensors | bin (official is .pth).
    Returns what a user passes: the file, or the folder for Hugging Face.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "hf":
        hf = folder / "hf"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps({"architectures": ["LevitForImageClassificationWithTeacher"]}))
        path = hf / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
        target = hf
    elif layout.startswith("official"):
        data = to_official(sd) if layout == "official" else fuse_official(to_official(sd))
        path = folder / f"{layout}.pth"
        torch.save({"model": data, "epoch": 299}, path)
        return path
    else:
        sd = to_timm(sd, conv_mode=layout == "timm_conv")
        path = target = folder / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return target
