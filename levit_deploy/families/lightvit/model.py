"""The reference LightViT: the module tree and state_dict keys of the official code (hunto/LightViT,
``lib/models/lightvit.py``), so official checkpoints load strictly, with its two export traps fixed.

- ``window_reverse`` in the official code computes the batch as ``int(windows.shape[0] / ...)``; a trace
  freezes that number, so a "dynamic-batch" export silently runs at one batch only. Here every reshape
  takes the batch from the tensor (-1), so the batch axis stays dynamic.
- The residual merge applies ``MaxPool3d((2, 2, 1))`` to a 4-D (B, H, W, C) tensor, which PyTorch reads
  as an unbatched 3-D pool; ONNX Runtime refuses the exported 3-D MaxPool on a 4-D input. Here it is the
  equivalent 2x2 ``max_pool2d`` on the channels-first view (no parameters either way).

Shapes come from the config, never from ``tensor.shape`` (a trace turns those into integer ops that Core ML
cannot convert), and the batch only ever appears as -1. The relative-position bias is gathered from its
table on every forward (never cached), as LeViT's is.
Each module with something to fold has ``fuse()`` (BatchNorm, bias gather, scale) or ``fold_norms()``
(LayerNorm affine into the following linears); the family's fusion steps apply them one kind at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import bn_scale_shift, fold_norm_into_linear, split_last
from .config import LightViTConfig


def relative_position_index(window: int) -> torch.Tensor:
    """[window^4] index into the (2w-1)^2 bias table for every (query, key) pair of a window (Swin v1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten()


class ConvStem(nn.Module):
    """Stride-8 convolutional stem: a 3x3/2 conv and three depthwise 3x3 convs (the last /2), each with
    BatchNorm and GELU, then a 3x3/2 projection and LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        s = dim // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, s, 3, 2, 1, bias=False), nn.BatchNorm2d(s), nn.GELU(),
            nn.Conv2d(s, s, 3, 1, 1, groups=s, bias=False), nn.BatchNorm2d(s), nn.GELU(),
            nn.Conv2d(s, s, 3, 1, 1, groups=s, bias=False), nn.BatchNorm2d(s), nn.GELU(),
            nn.Conv2d(s, s, 3, 2, 1, groups=s, bias=False), nn.BatchNorm2d(s), nn.GELU())
        self.proj = nn.Conv2d(s, dim, 3, 2, 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.stem(x)).flatten(2).transpose(1, 2))

    @torch.no_grad()
    def fuse(self) -> "ConvStem":
        """The same stem with every BatchNorm folded into the convolution before it."""
        layers: list[nn.Module] = []
        for conv, bn, act in zip(self.stem[0::3], self.stem[1::3], self.stem[2::3]):
            scale, shift = bn_scale_shift(bn)
            folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                               groups=conv.groups).to(conv.weight)
            folded.weight.copy_((conv.weight.double() * scale[:, None, None, None]).to(conv.weight.dtype))
            folded.bias.copy_(shift.to(conv.weight.dtype))
            layers += [folded, act]
        self.stem = nn.Sequential(*layers)
        return self


class LightViTAttention(nn.Module):
    """Local 7x7 window attention (with a relative-position bias) on the image tokens, global aggregation
    (global tokens attend to every image token) and global broadcast (image tokens attend to the new
    global tokens through ``kv_global``); one output projection over [global; image] tokens."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, window: int):
        super().__init__()
        self.num_heads, self.num_tokens, self.window = num_heads, num_tokens, window
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.kv_global = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))

    def bias_table(self) -> torch.Tensor:
        """Dense [heads, w², w²] bias gathered from the current table (never cached)."""
        n = self.window ** 2
        return self.relative_position_bias_table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        q, k, v = split_last(self.qkv(x), self.qkv.in_features, 3)  # channels [q | k | v], each heads-major
        return attend(q * self.scale, k, v, self.bias_table(), self.kv_global, self.proj, self.num_tokens,
                      self.window, size, self.num_heads)

    @torch.no_grad()
    def fuse(self) -> "DeployLightViTAttention":
        """Bias table gathered into a constant, attention scale folded into the query rows of qkv."""
        qkv = nn.Linear(self.qkv.in_features, self.qkv.out_features).to(self.qkv.weight)
        dim = self.qkv.in_features
        scale = torch.ones(3 * dim, dtype=torch.float64)
        scale[:dim] = self.scale  # qkv output channels are [q | k | v], each head-major
        qkv.weight.copy_((self.qkv.weight.double() * scale[:, None]).to(qkv.weight.dtype))
        qkv.bias.copy_((self.qkv.bias.double() * scale).to(qkv.bias.dtype))
        return DeployLightViTAttention(qkv, self.kv_global, self.proj, self.bias_table().detach().clone(),
                                       self.num_heads, self.num_tokens, self.window)


class DeployLightViTAttention(nn.Module):
    """LightViTAttention with the bias as a float constant [heads, w², w²] and the scale in qkv's q rows."""

    def __init__(self, qkv: nn.Linear, kv_global: nn.Linear, proj: nn.Linear, bias: torch.Tensor, num_heads: int,
                 num_tokens: int, window: int):
        super().__init__()
        self.num_heads, self.num_tokens, self.window = num_heads, num_tokens, window
        self.qkv, self.kv_global, self.proj = qkv, kv_global, proj
        self.register_buffer("attention_bias", bias)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        q, k, v = split_last(self.qkv(x), self.qkv.in_features, 3)
        return attend(q, k, v, self.attention_bias, self.kv_global, self.proj, self.num_tokens, self.window, size,
                      self.num_heads)


def attend(q, k, v, bias, kv_global: nn.Linear, proj: nn.Linear, num_tokens: int, window: int,
           size: tuple[int, int], heads: int) -> torch.Tensor:
    """The three attentions of a LightViT block. q (already scaled), k, v: [B, NT + H·W, C], heads-major
    channels. Every intermediate stays at rank 4 or less, which Core ML requires."""
    h, w = size
    dim = proj.in_features
    hd = dim // heads

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # [..., n, C] -> [..., heads, n, hd]
        return t.unflatten(-1, (heads, hd)).transpose(-3, -2)

    def windows(t: torch.Tensor) -> torch.Tensor:  # image tokens [B, H·W, C] -> [B·nW, heads, w², hd]
        t = t.reshape(-1, window, w // window, window * dim).permute(0, 2, 1, 3)  # [B·H/w, W/w, w, w·C]
        return split_heads(t.reshape(-1, window * window, dim))

    img = slice(num_tokens, None)
    local = (windows(q[:, img]) @ windows(k[:, img]).transpose(-2, -1) + bias).softmax(-1) @ windows(v[:, img])
    local = local.transpose(1, 2).reshape(-1, w // window, window, window * dim)  # [B·H/w, W/w, w, w·C]
    local = local.permute(0, 2, 1, 3).reshape(-1, h * w, dim)  # windows back to raster order

    q_glb, q_img, k_img, v_img = split_heads(q[:, :num_tokens]), split_heads(q[:, img]), split_heads(k[:, img]), \
        split_heads(v[:, img])
    x_glb = ((q_glb @ k_img.transpose(-2, -1)).softmax(-1) @ v_img).transpose(1, 2).flatten(2)
    k_g, v_g = (split_heads(t) for t in split_last(kv_global(x_glb), dim, 2))
    x_img = local + ((q_img @ k_g.transpose(-2, -1)).softmax(-1) @ v_g).transpose(1, 2).flatten(2)
    return proj(torch.cat([x_glb, x_img], 1))


class BiAttn(nn.Module):
    """Bi-dimensional gates: a channel gate from the token mean and a spatial gate per token (sigmoids),
    multiplying the (un-normalised) input."""

    def __init__(self, dim: int):
        super().__init__()
        reduced = int(dim * 0.25)
        self.norm = nn.LayerNorm(dim)
        self.global_reduce = nn.Linear(dim, reduced)
        self.local_reduce = nn.Linear(dim, reduced)
        self.act_fn = nn.GELU()
        self.channel_select = nn.Linear(reduced, dim)
        self.spatial_select = nn.Linear(reduced * 2, 1)
        self.gate_fn = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        g = self.act_fn(self.global_reduce(y.mean(1, keepdim=True)))
        loc = self.act_fn(self.local_reduce(y))
        c_gate = self.gate_fn(self.channel_select(g))
        s_gate = self.gate_fn(self.spatial_select(torch.cat([loc, g.expand_as(loc)], -1)))
        return x * (c_gate * s_gate)

    def fold_norms(self) -> None:
        """The token mean is linear, so the norm's affine folds into both reduce projections."""
        self.norm = fold_norm_into_linear(self.norm, [self.global_reduce, self.local_reduce])


class BiAttnMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.attn = BiAttn(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm residual attention and residual bi-attention MLP over [global; image] tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, num_tokens: int, window: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = LightViTAttention(dim, num_heads, num_tokens, window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = BiAttnMlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        x = x + self.attn(self.norm1(x), size)
        return x + self.mlp(self.norm2(x)), size

    def fold_norms(self) -> None:
        self.norm1 = fold_norm_into_linear(self.norm1, [self.attn.qkv])
        self.norm2 = fold_norm_into_linear(self.norm2, [self.mlp.fc1])
        self.mlp.attn.fold_norms()


class ResidualMergePatch(nn.Module):
    """Downsampling between stages: 2x2 space-to-depth + LayerNorm + linear, plus a residual 2x2 max-pool +
    linear; the global tokens go through their own LayerNorm + linear."""

    def __init__(self, dim: int, out_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)
        self.res_proj = nn.Linear(dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = size
        g, x = x[:, :self.num_tokens], x[:, self.num_tokens:]
        x = x.unflatten(1, (h, w))  # [B, H, W, C]
        pooled = F.max_pool2d(x.permute(0, 3, 1, 2), 2, 2).flatten(2).transpose(1, 2)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).flatten(1, 2)
        x = self.reduction(self.norm(x)) + self.res_proj(pooled)
        return torch.cat([self.proj(self.norm2(g)), x], 1), (h // 2, w // 2)

    def fold_norms(self) -> None:
        self.norm = fold_norm_into_linear(self.norm, [self.reduction])
        self.norm2 = fold_norm_into_linear(self.norm2, [self.proj])


class LightViT(nn.Module):
    """LightViT classifier: conv stem, global tokens, three stages of blocks (merges between them),
    LayerNorm, a per-token neck (linear, LayerNorm, GELU), the mean over all tokens, a linear head."""

    def __init__(self, config: LightViTConfig):
        super().__init__()
        self.config = config
        c, nt = config.embed_dims, config.num_tokens
        self.patch_embed = ConvStem(c[0])
        self.global_token = nn.Parameter(torch.zeros(1, nt, c[0]))
        stages = []
        for s in range(3):
            blocks: list[nn.Module] = [ResidualMergePatch(c[s - 1], c[s], nt)] if s else []
            blocks += [Block(c[s], config.num_heads[s], config.mlp_ratios[s], nt, config.window)
                       for _ in range(config.depths[s])]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(c[-1], eps=1e-6)
        self.neck = nn.Sequential(nn.Linear(c[-1], config.neck_dim), nn.LayerNorm(config.neck_dim), nn.GELU())
        self.head = nn.Linear(config.neck_dim, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = self.config.img_size
        # Python control flow on shapes: skipped while tracing (the trace fixes the shape)
        if not torch.jit.is_tracing() and tuple(x.shape[1:]) != (3, size, size):
            raise ValueError(f"LightViT takes (B, 3, {size}, {size}) input, got {tuple(x.shape)}: its 7x7 windows "
                             f"need a token grid that is a multiple of 7 at every stage")
        side = self.config.resolutions[0]
        tokens = self.patch_embed(x)
        nt = self.config.num_tokens  # the global tokens, broadcast over the batch without reading its size
        x = torch.cat([torch.zeros_like(tokens[:, :nt]) + self.global_token, tokens], 1)
        grid = (side, side)
        for stage in self.stages:
            for block in stage:
                x, grid = block(x, grid)
        return self.head(self.neck(self.norm(x)).mean(1))

    def fold_final_norm(self) -> None:
        self.norm = fold_norm_into_linear(self.norm, [self.neck[0]])


def count_flops(config: LightViTConfig) -> int:
    """Multiply-adds per image: convolutions, linears and the attention products (the 49x49 local scores
    included, which the official ``flops()`` leaves out), no norms or activations."""
    c, nt = config.embed_dims, config.num_tokens
    total, side, s = 0, config.img_size, c[0] // 2
    side = (side + 1) // 2
    total += side * side * s * 3 * 9  # stem conv
    total += 2 * side * side * s * 9  # two depthwise convs
    side = (side + 1) // 2
    total += side * side * s * 9  # strided depthwise conv
    side = (side + 1) // 2
    total += side * side * c[0] * s * 9  # projection
    for stage in range(3):
        dim, hw = c[stage], config.resolutions[stage] ** 2
        if stage:
            prev = c[stage - 1]
            total += hw * 4 * prev * dim + hw * prev * dim + nt * prev * dim  # reduction, residual, tokens
        n, hidden, reduced = nt + hw, dim * config.mlp_ratios[stage], int(dim * 0.25)
        per_block = n * dim * 3 * dim  # qkv
        per_block += 2 * hw * config.window ** 2 * dim  # local window scores and values
        per_block += 2 * nt * hw * dim + nt * dim * 2 * dim + 2 * hw * nt * dim  # aggregation, kv_global, broadcast
        per_block += n * dim * dim + 2 * n * dim * hidden  # proj, MLP
        per_block += dim * reduced + n * dim * reduced + reduced * dim + n * 2 * reduced  # bi-attention gates
        total += config.depths[stage] * per_block
    n = nt + config.resolutions[2] ** 2
    return total + n * c[2] * config.neck_dim + config.neck_dim * config.num_classes
