"""Trained-like checkpoints: BatchNorm statistics computed from real activations, not drawn at random.

A trained checkpoint's BatchNorm running statistics are the batch statistics of the images it was
trained on. Channels that barely respond to those images get a tiny running variance, so on other
inputs (noise, photos of another kind) their BatchNorm scale amplifies fp32 rounding a thousandfold:
the original model is then far from its own fp64 result. Random statistics hide this. Here the
statistics come from a train-mode forward over one kind of image-like input ("calibration"), then
get a small perturbation, as fine-tuning or EMA would leave them; the tests gate on other kinds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from levit_deploy.preprocess import IMAGENET_MEAN, IMAGENET_STD


def smooth_images(n: int, seed: int = 0, low: int = 14, size: int = 224) -> torch.Tensor:
    """Low-detail images: bicubic-upsampled low-resolution colour noise, ImageNet-normalised."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, low, low, generator=g)
    rgb = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return _normalise(rgb)


CALIBRATION = {"smooth": smooth_images}


def _normalise(rgb: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


@torch.no_grad()
def calibrate_batchnorm_(model: torch.nn.Module, images: torch.Tensor, batch: int = 32,
                         forward=None) -> torch.nn.Module:
    """Every BatchNorm's running statistics := the batch statistics of ``images`` (train-mode forward)."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert bns, "no BatchNorm to calibrate"
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    forward = forward or model
    for i in range(0, len(images), batch):
        forward(images[i:i + batch])
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@torch.no_grad()
def perturb_statistics_(model: torch.nn.Module, rel: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """A small perturbation of the running statistics, as later fine-tuning or EMA would leave them."""
    g = torch.Generator().manual_seed(seed)
    for bn in (m for m in model.modules() if isinstance(m, _BatchNorm)):
        std = bn.running_var.sqrt()
        bn.running_mean.add_(rel * std * torch.randn(std.shape, generator=g))
        bn.running_var.mul_(torch.exp(rel * torch.randn(std.shape, generator=g)))
    return model


def make_trained_like_(model: torch.nn.Module, calibration: str = "smooth", n: int = 64, seed: int = 0,
                       forward=None) -> torch.nn.Module:
    """Calibrate a randomised model's BatchNorm statistics on ``calibration`` images, then perturb them."""
    images = CALIBRATION[calibration](n, seed=seed + 1000)
    calibrate_batchnorm_(model, images, forward=forward)
    return perturb_statistics_(model, seed=seed).eval()

