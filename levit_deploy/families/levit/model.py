"""The reference LeViT: the training-time structure, exactly as the checkpoints store it.

This model is what every checkpoint layout is loaded into and what every artifact is compared
with (run in float64). It keeps BatchNorm after every linear layer and looks the attention bias
up through its index table on every forward: there is no cache, so the bias can never go stale
whatever the order of ``load_state_dict``, ``.eval()`` and ``.to(dtype)``.
Each module knows its own fused form (``fuse()``); the family's fusion steps apply them one kind at a
time, and speed is the deploy model's job (deploy.py), not this module's.
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from ..base import bn_scale_shift, make_linear
from .config import LevitConfig
from .deploy import DeployAttention, DeployAttentionSubsample


def as_linear(module: nn.Module) -> nn.Linear:
    """A fused nn.Linear for a LinearNorm, or the module itself if it is already fused."""
    return module.fuse() if isinstance(module, LinearNorm) else module


class ConvNorm(nn.Sequential):
    """3x3 stride-2 convolution (no bias) followed by BatchNorm2d: one stem layer."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    @torch.no_grad()
    def fuse(self) -> nn.Conv2d:
        scale, shift = bn_scale_shift(self.bn)
        w = self.conv.weight
        out = nn.Conv2d(w.shape[1], w.shape[0], 3, 2, 1)
        out.weight.data = (w.double() * scale[:, None, None, None]).to(w.dtype)
        out.bias.data = shift.to(w.dtype)
        return out.to(w.device)


class LinearNorm(nn.Module):
    """Linear (no bias) followed by BatchNorm1d over all tokens, the unit LeViT uses everywhere."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.bn = nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        scale, shift = bn_scale_shift(self.bn)
        w = self.linear.weight
        return make_linear(w.double() * scale[:, None], shift, w)


class NormLinear(nn.Module):
    """BatchNorm1d then Linear with bias: a classification head."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim)
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))

    @torch.no_grad()
    def fuse(self) -> nn.Linear:
        """linear(bn(x)) = W·(x·scale + shift) + b = (W·scale)·x + (W·shift + b)."""
        scale, shift = bn_scale_shift(self.bn)
        w, b = self.linear.weight.double(), self.linear.bias.double()
        return make_linear(w * scale[None, :], w @ shift + b, self.linear.weight)


def attention_bias_idxs(resolution: int, stride: int = 1) -> torch.Tensor:
    """Index of the bias shared by query q and key k: |Δy|·r + |Δx| in the input grid.

    Queries live on the grid subsampled by ``stride``; keys on the full grid. Shape [N_q, N_k].
    """
    q_side = (resolution - 1) // stride + 1
    keys = list(itertools.product(range(resolution), range(resolution)))
    queries = [(y * stride, x * stride) for y, x in itertools.product(range(q_side), range(q_side))]
    idxs = [[abs(qy - ky) * resolution + abs(qx - kx) for ky, kx in keys] for qy, qx in queries]
    return torch.tensor(idxs, dtype=torch.long)


class Attention(nn.Module):
    """Multi-head attention with a learned, translation-invariant bias per head.

    qkv channels are head-major: for each head [q (D), k (D), v (attn_ratio·D)].
    """

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, resolution: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = attn_ratio * key_dim
        self.resolution = resolution
        self.scale = key_dim ** -0.5
        self.qkv = LinearNorm(dim, num_heads * (2 * key_dim + self.val_dim))
        self.act = nn.Hardswish()
        self.proj = LinearNorm(num_heads * self.val_dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution**2))
        self.register_buffer("attention_bias_idxs", attention_bias_idxs(resolution), persistent=False)

    def bias_table(self) -> torch.Tensor:
        """Dense [heads, N, N] bias, gathered from the current parameters (never cached)."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.bias_table()
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj(self.act(x))

    @torch.no_grad()
    def fuse(self) -> DeployAttention:
        """Regroup head-major [q k v] rows into [Q | K | V] and fold the scale into Q."""
        qkv = as_linear(self.qkv)
        h, d, v = self.num_heads, self.key_dim, self.val_dim
        w = qkv.weight.double().view(h, 2 * d + v, -1)
        b = qkv.bias.double().view(h, 2 * d + v)
        parts_w = [w[:, :d] * self.scale, w[:, d:2 * d], w[:, 2 * d:]]
        parts_b = [b[:, :d] * self.scale, b[:, d:2 * d], b[:, 2 * d:]]
        grouped = make_linear(torch.cat([p.reshape(-1, w.shape[-1]) for p in parts_w]),
                          torch.cat([p.reshape(-1) for p in parts_b]), qkv.weight)
        return DeployAttention(grouped, as_linear(self.proj), self.bias_table().detach().clone(), h, d, v)


class AttentionSubsample(nn.Module):
    """Shrinking attention between stages: queries on the stride-2 grid, no residual."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: int,
                 resolution: int, stride: int = 2):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = attn_ratio * key_dim
        self.resolution = resolution
        self.stride = stride
        self.scale = key_dim ** -0.5
        self.kv = LinearNorm(in_dim, num_heads * (key_dim + self.val_dim))
        self.q = LinearNorm(in_dim, num_heads * key_dim)
        self.act = nn.Hardswish()
        self.proj = LinearNorm(num_heads * self.val_dim, out_dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution**2))
        self.register_buffer("attention_bias_idxs", attention_bias_idxs(resolution, stride),
                             persistent=False)

    def bias_table(self) -> torch.Tensor:
        return self.attention_biases[:, self.attention_bias_idxs]

    def subsample(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        r, s = self.resolution, self.stride
        return x.view(b, r, r, c)[:, ::s, ::s].reshape(b, -1, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        k, v = self.kv(x).view(b, n, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = self.q(self.subsample(x))
        n_q = q.shape[1]
        q = q.view(b, n_q, self.num_heads, self.key_dim).transpose(1, 2)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.bias_table()
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n_q, -1)
        return self.proj(self.act(x))

    @torch.no_grad()
    def fuse(self) -> DeployAttentionSubsample:
        """Regroup head-major [k v] rows into [K | V]; fold the scale into the query projection."""
        kv, q = as_linear(self.kv), as_linear(self.q)
        h, d, v = self.num_heads, self.key_dim, self.val_dim
        w = kv.weight.double().view(h, d + v, -1)
        b = kv.bias.double().view(h, d + v)
        grouped = make_linear(torch.cat([w[:, :d].reshape(-1, w.shape[-1]), w[:, d:].reshape(-1, w.shape[-1])]),
                          torch.cat([b[:, :d].reshape(-1), b[:, d:].reshape(-1)]), kv.weight)
        scaled_q = make_linear(q.weight.double() * self.scale, q.bias.double() * self.scale, q.weight)
        return DeployAttentionSubsample(grouped, scaled_q, as_linear(self.proj),
                                        self.bias_table().detach().clone(), h, d, v, self.resolution,
                                        self.stride)


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: int):
        super().__init__()
        self.up = LinearNorm(dim, dim * ratio)
        self.act = nn.Hardswish()
        self.down = LinearNorm(dim * ratio, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    """Residual attention followed by residual MLP (drop-path is a training-only no-op here)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: int, mlp_ratio: int,
                 resolution: int):
        super().__init__()
        self.attn = Attention(dim, key_dim, num_heads, attn_ratio, resolution)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class Downsample(nn.Module):
    """Shrinking attention (no residual) followed by a residual MLP in the new width."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: int,
                 mlp_ratio: int, resolution: int):
        super().__init__()
        self.attn = AttentionSubsample(in_dim, out_dim, key_dim, num_heads, attn_ratio, resolution)
        self.mlp = Mlp(out_dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x)
        return x + self.mlp(x)


class Stage(nn.Module):
    def __init__(self, downsample: Downsample | None, blocks: list[Block]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class Stem(nn.Module):
    """Four 3x3 stride-2 conv+BN, Hardswish between them: 224 px -> 14x14 tokens of width C0."""

    def __init__(self, out_dim: int):
        super().__init__()
        widths = [3, out_dim // 8, out_dim // 4, out_dim // 2, out_dim]
        self.convs = nn.ModuleList(ConvNorm(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            if i:
                x = self.act(x)
            x = conv(x)
        return x.flatten(2).transpose(1, 2)


class Levit(nn.Module):
    """LeViT classifier. In eval mode the output is the logits tensor (mean of both heads if distilled)."""

    def __init__(self, config: LevitConfig):
        super().__init__()
        self.config = config
        c, d, h, depth = config.embed_dims, config.key_dim, config.num_heads, config.depths
        res = config.resolutions
        self.stem = Stem(c[0])
        stages = []
        for s in range(3):
            down = None
            if s > 0:
                down = Downsample(c[s - 1], c[s], d, config.down_heads[s - 1], config.down_attn_ratio,
                                  config.down_mlp_ratio, res[s - 1])
            blocks = [Block(c[s], d, h[s], config.attn_ratio, config.mlp_ratio, res[s])
                      for _ in range(depth[s])]
            stages.append(Stage(down, blocks))
        self.stages = nn.ModuleList(stages)
        self.head = NormLinear(c[-1], config.num_classes)
        self.head_dist = NormLinear(c[-1], config.num_classes) if config.distilled else None

    def check_input(self, x: torch.Tensor) -> None:
        size = self.config.img_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(
                f"LeViT takes (B, 3, {size}, {size}) input, got {tuple(x.shape)}: its attention-bias "
                f"tables are built for one resolution, so only the batch size may vary")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x.mean(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.forward_features(x)
        if self.head_dist is None:
            return self.head(x)
        return (self.head(x) + self.head_dist(x)) / 2


def count_flops(config: LevitConfig) -> int:
    """Multiply-adds per image, counted the way the paper does (convs, linears, attention products)."""
    c, d = config.embed_dims, config.key_dim
    total = 0
    side = config.img_size
    widths = [3, c[0] // 8, c[0] // 4, c[0] // 2, c[0]]
    for a, b in zip(widths[:-1], widths[1:]):
        side = (side - 1) // 2 + 1
        total += side * side * b * a * 9
    res = config.resolutions
    for s in range(3):
        if s > 0:
            r_in, r_out, heads = res[s - 1], res[s], config.down_heads[s - 1]
            n_in, n_out, v = r_in**2, r_out**2, config.down_attn_ratio * d
            total += n_in * c[s - 1] * heads * (d + v)  # kv
            total += n_out * c[s - 1] * heads * d  # q
            total += heads * n_out * n_in * (d + v)  # q·kᵀ and attn·v
            total += n_out * heads * v * c[s]  # proj
            total += 2 * n_out * c[s] * c[s] * config.down_mlp_ratio
        n, heads, v = res[s] ** 2, config.num_heads[s], config.attn_ratio * d
        per_block = n * c[s] * heads * (2 * d + v) + heads * n * n * (d + v) + n * heads * v * c[s]
        per_block += 2 * n * c[s] * c[s] * config.mlp_ratio
        total += config.depths[s] * per_block
    heads_count = 2 if config.distilled else 1
    total += heads_count * c[-1] * config.num_classes
    return total
