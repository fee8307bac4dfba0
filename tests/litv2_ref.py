"""An independent LITv2 for the tests: a plain function of the official state dict and an image batch, and
a loop transcription of the official CUDA deformable-convolution kernel.

Written from the paper (Pan et al. 2022) and the official code's structure and key names, deliberately not
with levit_deploy's modules: the deformable convolution samples with the bilinear "tent" weights
max(0, 1-|h-y|)·max(0, 1-|w-x|) summed over every pixel (zero outside the image falls out of the formula),
Hi-Fi windows are attended one by one in Python loops, the Lo-Fi pooling is an explicit mean of 2x2 blocks,
and every norm and linear is a functional call on the state dict's tensors. Slow, and meant to be.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

VARIANTS = {"litv2_s": (96, (2, 2, 6, 2), (3, 6, 12, 24)), "litv2_m": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
            "litv2_b": (128, (2, 2, 18, 2), (4, 8, 16, 32))}
ALPHA, LOCAL_WS = 0.9, (0, 0, 2, 1)


def deform_conv_loop(x, offset, weight, bias, stride, padding):
    """Literal scalar transcription of ``deformable_2d_im2col_gpu_kernel`` + the addmm (float64)."""
    b_, c_, height, width = x.shape
    cout, _, kh, kw = weight.shape
    ho = (height + 2 * padding - kh) // stride + 1
    wo = (width + 2 * padding - kw) // stride + 1
    xd, od = x.double(), offset.double()

    def bilinear(img, h, w):
        hl, wl = math.floor(h), math.floor(w)
        hh, wh = hl + 1, wl + 1
        lh, lw = h - hl, w - wl
        v1 = img[hl, wl].item() if hl >= 0 and wl >= 0 else 0.0
        v2 = img[hl, wh].item() if hl >= 0 and wh <= width - 1 else 0.0
        v3 = img[hh, wl].item() if hh <= height - 1 and wl >= 0 else 0.0
        v4 = img[hh, wh].item() if hh <= height - 1 and wh <= width - 1 else 0.0
        return (1 - lh) * (1 - lw) * v1 + (1 - lh) * lw * v2 + lh * (1 - lw) * v3 + lh * lw * v4

    cols = torch.zeros(b_, c_ * kh * kw, ho * wo, dtype=torch.float64)
    for b in range(b_):
        for c in range(c_):
            for hc in range(ho):
                for wc in range(wo):
                    for i in range(kh):
                        for j in range(kw):
                            off_h = od[b, 2 * (i * kw + j), hc, wc].item()
                            off_w = od[b, 2 * (i * kw + j) + 1, hc, wc].item()
                            h_im = hc * stride - padding + i + off_h
                            w_im = wc * stride - padding + j + off_w
                            if -1 < h_im < height and -1 < w_im < width:
                                cols[b, c * kh * kw + i * kw + j, hc * wo + wc] = bilinear(xd[b, c], h_im, w_im)
    out = weight.double().reshape(cout, -1) @ cols + bias.double().view(-1, 1)
    return out.reshape(b_, cout, ho, wo)


def deform_conv_tent(x, offset, weight, bias, stride, padding):
    """The same convolution through dense tent weights: sample = Σ_yx img[y, x]·relu(1-|h-y|)·relu(1-|w-x|)."""
    b_, c_, height, width = x.shape
    cout, _, k, _ = weight.shape
    ho = (height + 2 * padding - k) // stride + 1
    wo = (width + 2 * padding - k) // stride + 1
    ys = torch.arange(height, dtype=x.dtype)
    xs = torch.arange(width, dtype=x.dtype)
    out = bias.view(1, -1, 1, 1).expand(b_, cout, ho, wo).clone()
    for i in range(k):
        for j in range(k):
            h = (torch.arange(ho, dtype=x.dtype) * stride - padding + i).view(1, ho, 1) + offset[:, 2 * (i * k + j)]
            w = (torch.arange(wo, dtype=x.dtype) * stride - padding + j).view(1, 1, wo) + offset[:, 2 * (i * k + j) + 1]
            ty = (1 - (h[..., None] - ys).abs()).clamp(min=0)  # [B, Ho, Wo, H]
            tx = (1 - (w[..., None] - xs).abs()).clamp(min=0)  # [B, Ho, Wo, W]
            sampled = torch.einsum("bchw,bpqh,bpqw->bcpq", x, ty, tx)
            out = out + torch.einsum("oc,bcpq->bopq", weight[:, :, i, j], sampled)
    return out


def _ln(x, sd, p):
    return F.layer_norm(x, x.shape[-1:], sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)


def _linear(x, sd, p):
    return F.linear(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"))


def _mlp(x, sd, p, side):
    b, n, _ = x.shape
    h = _linear(x, sd, f"{p}.fc1")
    g = h.transpose(1, 2).reshape(b, -1, side, side)
    w = sd[f"{p}.dwconv.dwconv.weight"]
    g = F.conv2d(g, w, sd[f"{p}.dwconv.dwconv.bias"], padding=1, groups=w.shape[0])
    return _linear(F.gelu(g.flatten(2).transpose(1, 2)), sd, f"{p}.fc2")


def _hilo(x, sd, p, heads, ws, side):
    b, n, c = x.shape
    hd = c // heads
    l_heads = heads if ws == 1 else int(heads * ALPHA)
    h_heads = heads - l_heads
    scale = hd ** -0.5
    outs = []
    if h_heads:
        qkv = _linear(x, sd, f"{p}.h_qkv").reshape(b, side, side, 3, h_heads, hd)
        o = torch.empty(b, side, side, h_heads, hd, dtype=x.dtype)
        for wy in range(0, side, ws):
            for wx in range(0, side, ws):
                win = qkv[:, wy:wy + ws, wx:wx + ws].reshape(b, ws * ws, 3, h_heads, hd).permute(2, 0, 3, 1, 4)
                a = torch.softmax(win[0] @ win[1].transpose(-1, -2) * scale, -1)
                o[:, wy:wy + ws, wx:wx + ws] = (a @ win[2]).permute(0, 2, 1, 3).reshape(b, ws, ws, h_heads, hd)
        outs.append(_linear(o.reshape(b, n, h_heads * hd), sd, f"{p}.h_proj"))
    q = _linear(x, sd, f"{p}.l_q").reshape(b, n, l_heads, hd).transpose(1, 2)
    src = x
    if ws > 1:
        grid = x.reshape(b, side // ws, ws, side // ws, ws, c)
        src = grid.mean(dim=(2, 4)).reshape(b, -1, c)
    kv = _linear(src, sd, f"{p}.l_kv").reshape(b, -1, 2, l_heads, hd).permute(2, 0, 3, 1, 4)
    a = torch.softmax(q @ kv[0].transpose(-1, -2) * scale, -1)
    outs.append(_linear((a @ kv[1]).transpose(1, 2).reshape(b, n, l_heads * hd), sd, f"{p}.l_proj"))
    return torch.cat(outs, -1)


def litv2_logits(sd: dict, x: torch.Tensor, variant: str) -> torch.Tensor:
    embed, depths, heads = VARIANTS[variant]
    sd = {k: v.to(x.dtype) if v.is_floating_point() else v for k, v in sd.items()}
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    side = t.shape[-1]
    t = _ln(t.flatten(2).transpose(1, 2), sd, "patch_embed.norm")
    for s in range(4):
        for i in range(depths[s]):
            p = f"layers.{s}.blocks.{i}"
            if LOCAL_WS[s]:
                t = t + _hilo(_ln(t, sd, f"{p}.norm1"), sd, f"{p}.attn", heads[s], LOCAL_WS[s], side)
            t = t + _mlp(_ln(t, sd, f"{p}.norm2"), sd, f"{p}.mlp", side)
        if s < 3:
            p = f"layers.{s}.downsample"
            g = t.transpose(1, 2).reshape(t.shape[0], -1, side, side)
            offset = F.conv2d(g, sd[f"{p}.dconv.conv_offset.weight"], sd[f"{p}.dconv.conv_offset.bias"], stride=2)
            g = deform_conv_tent(g, offset, sd[f"{p}.dconv.weight"], sd[f"{p}.dconv.bias"], 2, 0)
            g = F.batch_norm(g, sd[f"{p}.norm_layer.running_mean"], sd[f"{p}.norm_layer.running_var"],
                             sd[f"{p}.norm_layer.weight"], sd[f"{p}.norm_layer.bias"], False, 0.0, 1e-5)
            t = F.gelu(g).flatten(2).transpose(1, 2)
            side //= 2
    return _linear(_ln(t, sd, "norm").mean(1), sd, "head")
