"""DeployLevit: LeViT with its training-time structure folded away.

No BatchNorm, no integer index tensors, no gathers: every linear carries its bias, every attention
block adds a dense float bias constant [heads, N_q, N_k], the attention scale lives in the query
weights, and one linear head returns the mean of the two trained heads. The token layout is
(B, N, C) with nn.Linear, which exports to plain MatMul+Add; see benchmarks/fused_layout.py for
the measurement that chose it over BCHW 1x1 convolutions.
"""
from __future__ import annotations

import torch
from torch import nn


class DeployAttention(nn.Module):
    """Attention with q/k/v weights grouped [Q of all heads | K | V] and the scale folded into Q."""

    def __init__(self, qkv: nn.Linear, proj: nn.Linear, bias: torch.Tensor, num_heads: int,
                 key_dim: int, val_dim: int):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.qkv = qkv
        self.act = nn.Hardswish()
        self.proj = proj
        self.register_buffer("attention_bias", bias)  # [heads, N, N] float constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hd = self.num_heads * self.key_dim
        qkv = self.qkv(x)
        q = qkv[..., :hd].unflatten(-1, (self.num_heads, self.key_dim)).transpose(1, 2)
        k = qkv[..., hd:2 * hd].unflatten(-1, (self.num_heads, self.key_dim)).permute(0, 2, 3, 1)
        v = qkv[..., 2 * hd:].unflatten(-1, (self.num_heads, self.val_dim)).transpose(1, 2)
        attn = (q @ k + self.attention_bias).softmax(dim=-1)
        return self.proj(self.act((attn @ v).transpose(1, 2).flatten(2)))


class DeployAttentionSubsample(nn.Module):
    """Shrinking attention: k/v grouped [K | V], scaled queries on the stride-2 token grid."""

    def __init__(self, kv: nn.Linear, q: nn.Linear, proj: nn.Linear, bias: torch.Tensor, num_heads: int,
                 key_dim: int, val_dim: int, resolution: int, stride: int):
        super().__init__()
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, val_dim
        self.resolution, self.stride = resolution, stride
        self.kv = kv
        self.q = q
        self.act = nn.Hardswish()
        self.proj = proj
        self.register_buffer("attention_bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hd = self.num_heads * self.key_dim
        kv = self.kv(x)
        k = kv[..., :hd].unflatten(-1, (self.num_heads, self.key_dim)).permute(0, 2, 3, 1)
        v = kv[..., hd:].unflatten(-1, (self.num_heads, self.val_dim)).transpose(1, 2)
        r, s = self.resolution, self.stride
        x_sub = x.unflatten(1, (r, r))[:, ::s, ::s].flatten(1, 2)
        q = self.q(x_sub).unflatten(-1, (self.num_heads, self.key_dim)).transpose(1, 2)
        attn = (q @ k + self.attention_bias).softmax(dim=-1)
        return self.proj(self.act((attn @ v).transpose(1, 2).flatten(2)))


class DeployMlp(nn.Sequential):
    def __init__(self, up: nn.Linear, down: nn.Linear):
        super().__init__()
        self.up = up
        self.act = nn.Hardswish()
        self.down = down


class DeployHead(nn.Module):
    """Mean over tokens, then one linear layer (BatchNorm folded, both heads merged)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(tokens.mean(1))


class DeployLevit(nn.Module):
    """The fused model that every exporter sees. Input (B, 3, 224, 224) float32, output logits."""

    def __init__(self, stem: nn.Sequential, stages: nn.Sequential, head: DeployHead, config):
        super().__init__()
        self.config = config
        self.stem = stem
        self.stages = stages
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.img_size
        # Shape checks are Python control flow: skip them while tracing (the trace fixes the shape).
        if not torch.jit.is_tracing() and tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"LeViT takes (B, 3, {size}, {size}) input, got {tuple(x.shape)}: its "
                             f"attention-bias tables are built for one resolution")
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.stages(tokens))


class Residual(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)
