"""Deformable convolution (DCNv1, as the official ``DeformConv2dPack``) in plain tensor ops, so it exports
to standard ONNX and runs anywhere.

Semantics, from the official CUDA kernel (``mm_modules/DCN/src/deform_conv_cuda_kernel.cu``): the offset
tensor has 2·kh·kw channels, (dy, dx) interleaved per kernel point, kernel points in row-major order; kernel
point (i, j) of output (ho, wo) samples the input at (ho·s − p + i·d + dy, wo·s − p + j·d + dx) bilinearly,
every neighbour outside the image counting as 0 (hence 0 for a point outside (−1, H) × (−1, W)); the samples
form the im2col columns (row c·kh·kw + i·kw + j) that one matmul with the weight turns into the output.

Two ways to sample, the same numbers (``tests/test_litv2.py`` checks both against a loop transcription of
the kernel); which one is faster depends on the runtime (``benchmarks/deform_conv.py``):

- ``gather``: the four neighbours' flat indices, clamped, ``GatherElements``, zeroed where outside;
- ``grid_sample``: ``GridSample`` (bilinear, zeros padding, align_corners=True) at the normalised positions;
- ``deformconv``: one opaque op that the ONNX exporter writes as ``DeformConv`` (opset 19), for runtimes
  with a kernel of their own (ONNX Runtime has one; OpenVINO's ONNX reader does not).

Positions and bilinear weights are computed in float32 even in an fp16 or bf16 graph: at fp16, a position near 56
would be off by up to 0.03 px.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METHODS = ("gather", "grid_sample", "deformconv")


def sampling_positions(offset: torch.Tensor, kernel: int, stride: int, padding: int, out_size: tuple[int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, w) sampling positions in input pixels, each [B, k·k, Ho, Wo], at least float32."""
    ho, wo = out_size
    dtype = torch.float32 if offset.dtype in (torch.float16, torch.bfloat16) else offset.dtype
    offset = offset.to(dtype)
    dy, dx = offset[:, 0::2], offset[:, 1::2]  # channels are dy, dx interleaved per kernel point
    ki = torch.arange(kernel, dtype=dtype).repeat_interleave(kernel).view(-1, 1, 1)
    kj = torch.arange(kernel, dtype=dtype).repeat(kernel).view(-1, 1, 1)
    rows = (torch.arange(ho, dtype=dtype) * stride - padding).view(1, -1, 1)
    cols = (torch.arange(wo, dtype=dtype) * stride - padding).view(1, 1, -1)
    return rows + ki + dy, cols + kj + dx


def sample_gather(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, size: tuple[int, int], channels: int
                  ) -> torch.Tensor:
    """Bilinear samples of x [B, C, H, W] at (h, w) [B, K, Ho, Wo], zero outside: [B, C, K·Ho·Wo]."""
    height, width = size
    flat = x.flatten(2)
    h0, w0 = torch.floor(h), torch.floor(w)
    lh, lw = h - h0, w - w0
    out = None
    for dy, dx, weight in ((0, 0, (1 - lh) * (1 - lw)), (0, 1, (1 - lh) * lw), (1, 0, lh * (1 - lw)), (1, 1, lh * lw)):
        hi, wi = h0 + dy, w0 + dx
        inside = (hi >= 0) & (hi <= height - 1) & (wi >= 0) & (wi <= width - 1)
        index = (hi.clamp(0, height - 1) * width + wi.clamp(0, width - 1)).long().flatten(1)
        values = torch.gather(flat, 2, index.unsqueeze(1).expand(-1, channels, -1))
        term = values * (weight * inside).flatten(1).unsqueeze(1).to(x.dtype)
        out = term if out is None else out + term
    return out


def sample_grid(x: torch.Tensor, h: torch.Tensor, w: torch.Tensor, size: tuple[int, int], channels: int
                ) -> torch.Tensor:
    """The same samples through grid_sample: [B, C, K·Ho·Wo]."""
    height, width = size
    h, w = h.flatten(1, 2), w.flatten(1, 2)  # [B, K·Ho, Wo]: every tensor stays at rank 4 (Core ML's limit)
    grid = torch.stack([w * (2 / (width - 1)) - 1, h * (2 / (height - 1)) - 1], -1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True).flatten(2)


SAMPLERS = {"gather": sample_gather, "grid_sample": sample_grid}


def deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  channels: int, kernel: int, stride: int, padding: int, size: tuple[int, int],
                  method: str = "gather") -> torch.Tensor:
    """DCNv1 (groups 1, one offset group, dilation 1) on x [B, ``channels``, H, W] of spatial ``size``. Sizes
    are given, never read from tensors: a trace turns such reads into integer ops Core ML cannot convert."""
    ho = (size[0] + 2 * padding - kernel) // stride + 1
    wo = (size[1] + 2 * padding - kernel) // stride + 1
    h, w = sampling_positions(offset, kernel, stride, padding, (ho, wo))
    columns = SAMPLERS[method](x, h, w, size, channels).unflatten(2, (kernel * kernel, ho * wo)).flatten(1, 2)
    out = torch.matmul(weight.flatten(1), columns)  # [Cout, C·K] @ [B, C·K, L]
    if bias is not None:
        out = out + bias.view(-1, 1)
    return out.unflatten(2, (ho, wo))


@torch.library.custom_op("levit_deploy::deform_conv2d", mutates_args=())
def deform_conv2d_op(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, kernel: int,
                     stride: int, padding: int) -> torch.Tensor:
    """One opaque op for exporters that have a deformable convolution of their own (ONNX ``DeformConv``,
    opset 19; ONNX Runtime implements it, OpenVINO's ONNX reader does not); eager it is the gather form."""
    size = (x.shape[2], x.shape[3])
    return deform_conv2d(x, offset, weight, bias, x.shape[1], kernel, stride, padding, size, "gather")


@deform_conv2d_op.register_fake
def _(x, offset, weight, bias, kernel, stride, padding):
    return x.new_empty(x.shape[0], weight.shape[0], (x.shape[2] + 2 * padding - kernel) // stride + 1,
                       (x.shape[3] + 2 * padding - kernel) // stride + 1)


def onnx_translations() -> dict:
    """torch.onnx (dynamo) translation of :func:`deform_conv2d_op` into ONNX ``DeformConv``."""
    from onnxscript import opset19 as op

    def deform_conv(x, offset, weight, bias, kernel: int, stride: int, padding: int):
        return op.DeformConv(x, weight, offset, bias, kernel_shape=[kernel, kernel], strides=[stride, stride],
                             pads=[padding] * 4)

    return {torch.ops.levit_deploy.deform_conv2d.default: deform_conv}
