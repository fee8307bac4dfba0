"""The reference LITv2: the module tree and state_dict keys of the official code (ziplab/LITv2,
``classification/models/{litv2,blocks,attentions,layers}.py``), so official checkpoints load strictly,
with what keeps the official model off CPUs and out of ONNX replaced:

- the DTM's ``DeformConv2dPack`` (a compiled CUDA extension behind NVIDIA apex, no CPU kernel, no ONNX
  symbolic, odd batches ≥ 5 refused) is :func:`.deform.deform_conv2d` in plain tensor ops, any batch;
- token grids come from the config (the official code reads ``H = W = int(N ** 0.5)`` and the DTM's
  constructor resolution), never from tensor shapes, and the batch only ever appears as -1, so exports keep
  a dynamic batch; every intermediate stays at rank 4 or less (Core ML).

Each module with something to fold has ``fuse()`` (the DTM's BatchNorm, the attention scale) or
``fold_norms()`` (LayerNorm affine into the following linears); the fusion steps apply them one kind at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import bn_scale_shift, fold_norm_into_linear, split_last
from .config import LITv2Config
from .deform import deform_conv2d, deform_conv2d_op, onnx_translations


def to_grid(x: torch.Tensor, side: int) -> torch.Tensor:
    """Tokens [B, side², C] (row-major) -> feature map [B, C, side, side]."""
    return x.transpose(1, 2).unflatten(2, (side, side))


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """4x4/4 convolution and LayerNorm."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_tokens(self.proj(x)))


class DWConv(nn.Module):
    def __init__(self, dim: int, side: int):
        super().__init__()
        self.side = side
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(self.dwconv(to_grid(x, self.side)))


class DWMlp(nn.Module):
    """fc1 -> 3x3 depthwise conv -> GELU -> fc2 (no activation between fc1 and the conv)."""

    def __init__(self, dim: int, hidden: int, side: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden, side)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x))))


class ConvFFNBlock(nn.Module):
    """Stages 1-2: a residual MLP block, no attention (the official module has no norm1)."""

    def __init__(self, dim: int, mlp_ratio: int, side: int):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = DWMlp(dim, dim * mlp_ratio, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm2(x))

    def fold_norms(self) -> None:
        self.norm2 = fold_norm_into_linear(self.norm2, [self.mlp.fc1])


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., n, heads·hd] -> [..., heads, n, hd]."""
    return t.unflatten(-1, (heads, -1)).transpose(-3, -2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention over heads-split tensors; ``scale`` is 1 once it is folded into the queries."""
    scores = q @ k.transpose(-2, -1)
    if scale != 1.0:
        scores = scores * scale
    return scores.softmax(-1) @ v


class HiLo(nn.Module):
    """HiLo attention. Hi-Fi heads (h_qkv, h_proj) attend inside ws x ws windows; Lo-Fi heads (l_q, l_kv,
    l_proj) attend from every token to ws x ws average-pooled keys and values. With ws = 1 every head is
    Lo-Fi: plain multi-head attention. The output is [Hi-Fi channels | Lo-Fi channels]."""

    def __init__(self, dim: int, num_heads: int, window: int, alpha: float, side: int, qkv_bias: bool = True):
        super().__init__()
        head_dim = dim // num_heads
        self.l_heads = int(num_heads * alpha)  # the official code truncates: int(12 * 0.9) = 10
        self.h_heads = num_heads - self.l_heads
        if window == 1:
            self.l_heads, self.h_heads = num_heads, 0
        self.window, self.side, self.dim = window, side, dim
        self.scale = head_dim ** -0.5
        l_dim, h_dim = self.l_heads * head_dim, self.h_heads * head_dim
        self.h_dim = h_dim
        if self.l_heads:
            self.l_q = nn.Linear(dim, l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(l_dim, l_dim)
        if self.h_heads:
            self.h_qkv = nn.Linear(dim, 3 * h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(h_dim, h_dim)

    def hifi(self, x: torch.Tensor) -> torch.Tensor:
        ws, side, d = self.window, self.side, self.h_dim

        def windows(t: torch.Tensor) -> torch.Tensor:  # [B, N, d] -> [B·nW, heads, ws², hd]
            t = t.reshape(-1, ws, side // ws, ws * d).permute(0, 2, 1, 3)  # [B·H/ws, W/ws, ws, ws·d]
            return split_heads(t.reshape(-1, ws * ws, d), self.h_heads)

        q, k, v = split_last(self.h_qkv(x), d, 3)  # channels [q | k | v], each heads-major
        out = attention(windows(q), windows(k), windows(v), self.scale)  # [B·nW, heads, ws², hd]
        out = out.transpose(1, 2).reshape(-1, side // ws, ws, ws * d).permute(0, 2, 1, 3)
        return self.h_proj(out.reshape(-1, side * side, d))

    def lofi(self, x: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.l_q(x), self.l_heads)
        if self.window > 1:
            pooled = to_tokens(F.avg_pool2d(to_grid(x, self.side), self.window, self.window))
            kv = self.l_kv(pooled)
        else:
            kv = self.l_kv(x)
        k, v = (split_heads(t, self.l_heads) for t in split_last(kv, self.l_q.out_features, 2))  # [k | v]
        return self.l_proj(attention(q, k, v, self.scale).transpose(1, 2).flatten(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.h_heads:
            return self.lofi(x)
        if not self.l_heads:
            return self.hifi(x)
        return torch.cat([self.hifi(x), self.lofi(x)], -1)

    def queries(self) -> list[tuple[nn.Linear, int]]:
        """(linear, number of leading query rows) of each path."""
        found = []
        if self.l_heads:
            found.append((self.l_q, self.l_q.out_features))
        if self.h_heads:
            found.append((self.h_qkv, self.h_dim))
        return found

    @torch.no_grad()
    def fuse(self) -> "HiLo":
        """The attention scale folded into the query rows of l_q and h_qkv."""
        for linear, rows in self.queries():
            linear.weight[:rows] = (linear.weight[:rows].double() * self.scale).to(linear.weight.dtype)
            if linear.bias is not None:
                linear.bias[:rows] = (linear.bias[:rows].double() * self.scale).to(linear.bias.dtype)
        self.scale = 1.0
        return self

    def input_linears(self) -> list[nn.Linear]:
        """The linears the block's norm1 feeds (l_kv through the average pool, which is linear too)."""
        return ([self.l_q, self.l_kv] if self.l_heads else []) + ([self.h_qkv] if self.h_heads else [])


class Block(nn.Module):
    """Stages 3-4: pre-norm residual HiLo attention and residual depthwise-conv MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, window: int, alpha: float, side: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HiLo(dim, num_heads, window, alpha, side)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = DWMlp(dim, dim * mlp_ratio, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def fold_norms(self) -> None:
        self.norm1 = fold_norm_into_linear(self.norm1, self.attn.input_linears())
        self.norm2 = fold_norm_into_linear(self.norm2, [self.mlp.fc1])


class DeformConv2dPack(nn.Module):
    """DCNv1 with its own offset predictor, under the official names: ``weight`` and ``bias`` of the
    deformable conv, ``conv_offset`` predicting 2·k·k offsets from the same input. ``method`` picks how the
    samples are gathered (``deform.METHODS``); the numbers are the same."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, side: int):
        super().__init__()
        self.in_channels, self.kernel, self.stride, self.padding, self.side = in_channels, kernel, stride, padding, side
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.conv_offset = nn.Conv2d(in_channels, 2 * kernel * kernel, kernel, stride, padding)
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        nn.init.zeros_(self.conv_offset.weight)  # the official init: a plain strided conv until trained
        nn.init.zeros_(self.conv_offset.bias)
        self.method = "gather"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        if self.method == "deformconv":
            return deform_conv2d_op(x, offset, self.weight, self.bias, self.kernel, self.stride, self.padding)
        return deform_conv2d(x, offset, self.weight, self.bias, self.in_channels, self.kernel, self.stride,
                             self.padding, (self.side, self.side), self.method)


class DTM(nn.Module):
    """Deformable token merging between stages: 2x2/2 deformable conv -> BatchNorm -> GELU."""

    def __init__(self, dim: int, side: int):
        super().__init__()
        self.side = side
        self.dconv = DeformConv2dPack(dim, 2 * dim, 2, 2, 0, side)
        self.norm_layer = nn.BatchNorm2d(2 * dim)
        self.act_layer = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_tokens(self.act_layer(self.norm_layer(self.dconv(to_grid(x, self.side)))))

    @torch.no_grad()
    def fuse(self) -> "DTM":
        """BatchNorm folded into the deformable conv's weight and bias (exact: the offsets come from the
        conv's input, which the BatchNorm does not touch)."""
        scale, shift = bn_scale_shift(self.norm_layer)
        conv = self.dconv
        conv.bias.copy_((conv.bias.double() * scale + shift).to(conv.bias.dtype))
        conv.weight.copy_((conv.weight.double() * scale[:, None, None, None]).to(conv.weight.dtype))
        self.norm_layer = nn.Identity()
        return self


class LITLayer(nn.Module):
    def __init__(self, config: LITv2Config, stage: int):
        super().__init__()
        dim, side, ws = config.dims[stage], config.resolutions[stage], config.local_ws[stage]
        if ws:
            blocks = [Block(dim, config.num_heads[stage], config.mlp_ratio, ws, config.alpha, side)
                      for _ in range(config.depths[stage])]
        else:
            blocks = [ConvFFNBlock(dim, config.mlp_ratio, side) for _ in range(config.depths[stage])]
        self.blocks = nn.ModuleList(blocks)
        self.downsample = DTM(dim, side) if stage < 3 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class LITv2(nn.Module):
    """LITv2 classifier: patch embedding, four stages (ConvFFN blocks, then HiLo blocks; DTM between),
    LayerNorm, the mean over tokens, a linear head."""

    def __init__(self, config: LITv2Config):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config.embed_dim, config.patch_size)
        self.layers = nn.ModuleList(LITLayer(config, s) for s in range(4))
        self.norm = nn.LayerNorm(config.dims[-1])
        self.head = nn.Linear(config.dims[-1], config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.img_size
        # Python control flow on shapes: skipped while tracing (the trace fixes the shape)
        if not torch.jit.is_tracing() and tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"LITv2 takes (B, 3, {size}, {size}) input, got {tuple(x.shape)}: its token grids are "
                             f"fixed at construction, as in the official code")
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))

    def fold_final_norm(self) -> None:
        """The token mean is linear, so the final norm's affine folds into the head."""
        self.norm = fold_norm_into_linear(self.norm, [self.head])

    def onnx_translations(self) -> dict:
        """Custom-op translations the ONNX exporter needs for this model (the DeformConv form)."""
        return onnx_translations() if any(getattr(m, "method", None) == "deformconv" for m in self.modules()) else {}

    def set_deform_method(self, method: str) -> None:
        for module in self.modules():
            if isinstance(module, DeformConv2dPack):
                module.method = method


def count_flops(config: LITv2Config) -> int:
    """Multiply-adds per image of convolutions, linears and attention products (no norms, activations or
    bilinear sampling), as the official ``flops()`` counts them, with the real 8 offset channels (it assumes 12)."""
    side, c = config.resolutions, config.dims
    total = side[0] ** 2 * c[0] * 3 * config.patch_size ** 2
    for stage in range(4):
        dim, n, hidden = c[stage], side[stage] ** 2, c[stage] * config.mlp_ratio
        per_block = 2 * n * dim * hidden + n * hidden * 9  # fc1, fc2, depthwise conv
        ws = config.local_ws[stage]
        if ws:
            heads = config.num_heads[stage]
            head_dim = dim // heads
            l_heads = heads if ws == 1 else int(heads * config.alpha)
            l_dim, h_dim = l_heads * head_dim, (heads - l_heads) * head_dim
            kv = n // (ws * ws)
            per_block += n * dim * 3 * h_dim + 2 * n * ws * ws * h_dim + n * h_dim * h_dim  # Hi-Fi
            per_block += n * dim * l_dim + kv * dim * 2 * l_dim + 2 * n * kv * l_dim + n * l_dim * l_dim  # Lo-Fi
        total += config.depths[stage] * per_block
        if stage < 3:
            out = (side[stage] // 2) ** 2
            total += out * 4 * dim * (2 * dim + 8)  # the deformable conv and its offset conv
    return total + c[-1] * config.num_classes
