"""An independent LightViT for the tests: a plain function of the official state dict and an image batch.

Written from the paper (Huang et al. 2022) and the official code's structure and key names, deliberately
not with levit_deploy's modules: windows are attended one by one in Python loops, the relative-position
index is built from its formula with explicit loops, the 2x2 max-pool is a reshape and a max, and every
LayerNorm, BatchNorm and convolution is a functional call on the state dict's tensors. Slow, and
meant to be: a shared mistake would have to be made twice in two different ways.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW = 7


def _ln(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _linear(x, sd, prefix):
    return F.linear(x, sd[f"{prefix}.weight"], sd.get(f"{prefix}.bias"))


def _bn(x, sd, prefix):
    return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"], sd[f"{prefix}.weight"],
                        sd[f"{prefix}.bias"], False, 0.0, 1e-5)


def _bias(table: torch.Tensor) -> torch.Tensor:
    """[heads, 49, 49]: bias(i, j) = table[(dy + 6) * 13 + (dx + 6)] for window positions i, j."""
    n = WINDOW * WINDOW
    out = torch.empty(table.shape[1], n, n, dtype=table.dtype)
    for i in range(n):
        for j in range(n):
            dy, dx = i // WINDOW - j // WINDOW, i % WINDOW - j % WINDOW
            out[:, i, j] = table[(dy + WINDOW - 1) * (2 * WINDOW - 1) + (dx + WINDOW - 1)]
    return out


def _attention(x, sd, p, heads, nt, h, w):
    b, n, c = x.shape
    hd = c // heads
    scale = hd ** -0.5
    qkv = _linear(x, sd, f"{p}.qkv")
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, n, heads, hd).transpose(1, 2) for i in range(3))
    bias = _bias(sd[f"{p}.relative_position_bias_table"])
    img = lambda t: t[:, :, nt:].reshape(b, heads, h, w, hd)  # noqa: E731
    qi, ki, vi = img(q), img(k), img(v)
    local = torch.empty(b, heads, h, w, hd, dtype=x.dtype)
    for wy in range(0, h, WINDOW):
        for wx in range(0, w, WINDOW):
            win = lambda t: t[:, :, wy:wy + WINDOW, wx:wx + WINDOW].reshape(b, heads, WINDOW * WINDOW, hd)  # noqa: E731
            a = torch.softmax(win(qi) * scale @ win(ki).transpose(-1, -2) + bias, -1)
            local[:, :, wy:wy + WINDOW, wx:wx + WINDOW] = (a @ win(vi)).reshape(b, heads, WINDOW, WINDOW, hd)
    local = local.permute(0, 2, 3, 1, 4).reshape(b, h * w, c)
    q_img, k_img, v_img = q[:, :, nt:], k[:, :, nt:], v[:, :, nt:]
    x_glb = (torch.softmax(q[:, :, :nt] * scale @ k_img.transpose(-1, -2), -1) @ v_img).transpose(1, 2).reshape(b, nt, c)
    kv = _linear(x_glb, sd, f"{p}.kv_global")
    k_g = kv[..., :c].reshape(b, nt, heads, hd).transpose(1, 2)
    v_g = kv[..., c:].reshape(b, nt, heads, hd).transpose(1, 2)
    x_img = local + (torch.softmax(q_img * scale @ k_g.transpose(-1, -2), -1) @ v_g).transpose(1, 2).reshape(b, h * w, c)
    return _linear(torch.cat([x_glb, x_img], 1), sd, f"{p}.proj")


def _mlp(x, sd, p):
    y = _linear(F.gelu(_linear(x, sd, f"{p}.fc1")), sd, f"{p}.fc2")
    z = _ln(y, sd, f"{p}.attn.norm", 1e-5)
    g = F.gelu(_linear(z.mean(1, keepdim=True), sd, f"{p}.attn.global_reduce"))
    loc = F.gelu(_linear(z, sd, f"{p}.attn.local_reduce"))
    channel = torch.sigmoid(_linear(g, sd, f"{p}.attn.channel_select"))
    spatial = torch.sigmoid(_linear(torch.cat([loc, g.expand(-1, z.shape[1], -1)], -1), sd, f"{p}.attn.spatial_select"))
    return y * channel * spatial


def _merge(x, sd, p, nt, h, w):
    b, _, c = x.shape
    g, img = x[:, :nt], x[:, nt:].reshape(b, h, w, c)
    pooled = img.reshape(b, h // 2, 2, w // 2, 2, c).amax(dim=(2, 4)).reshape(b, -1, c)
    quads = [img[:, dy::2, dx::2] for dy, dx in ((0, 0), (1, 0), (0, 1), (1, 1))]
    merged = torch.cat(quads, -1).reshape(b, -1, 4 * c)
    out = F.linear(_ln(merged, sd, f"{p}.norm", 1e-5), sd[f"{p}.reduction.weight"])
    out = out + F.linear(pooled, sd[f"{p}.res_proj.weight"])
    g = F.linear(_ln(g, sd, f"{p}.norm2", 1e-5), sd[f"{p}.proj.weight"])
    return torch.cat([g, out], 1)


def lightvit_logits(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits of the LightViT whose official state dict is ``sd`` for images ``x`` [B, 3, 224, 224]."""
    sd = {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in sd.items()}
    y = x
    for conv, bn, stride, depthwise in ((0, 1, 2, False), (3, 4, 1, True), (6, 7, 1, True), (9, 10, 2, True)):
        weight = sd[f"patch_embed.stem.{conv}.weight"]
        y = F.gelu(_bn(F.conv2d(y, weight, None, stride, 1, groups=weight.shape[0] if depthwise else 1), sd,
                       f"patch_embed.stem.{bn}"))
    y = F.conv2d(y, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], 2, 1)
    b, c, h, w = y.shape
    tokens = _ln(y.flatten(2).transpose(1, 2), sd, "patch_embed.norm", 1e-5)
    glb = sd["global_token"]
    nt = glb.shape[1]
    x = torch.cat([glb.expand(b, -1, -1), tokens], 1)
    stage = 0
    while any(k.startswith(f"stages.{stage}.") for k in sd):
        index = 0
        while any(k.startswith(f"stages.{stage}.{index}.") for k in sd):
            p = f"stages.{stage}.{index}"
            if f"{p}.reduction.weight" in sd:
                x = _merge(x, sd, p, nt, h, w)
                h, w = h // 2, w // 2
            else:
                heads = sd[f"{p}.attn.relative_position_bias_table"].shape[1]
                x = x + _attention(_ln(x, sd, f"{p}.norm1", 1e-6), sd, f"{p}.attn", heads, nt, h, w)
                x = x + _mlp(_ln(x, sd, f"{p}.norm2", 1e-6), sd, f"{p}.mlp")
            index += 1
        stage += 1
    x = _ln(x, sd, "norm", 1e-6)
    x = F.gelu(_ln(_linear(x, sd, "neck.0"), sd, "neck.1", 1e-5))
    return _linear(x.mean(1), sd, "head")
