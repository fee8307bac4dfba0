"""The three LightViT variants (Huang et al. 2022, Table 1 / the official model registry) as plain data."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

IMG_SIZE = 224
WINDOW = 7


@dataclass(frozen=True)
class LightViTConfig:
    """Hyper-parameters of one LightViT. Stage s has width embed_dims[s], depths[s] blocks and
    num_heads[s] heads; num_tokens global tokens travel through all stages."""

    family: ClassVar[str] = "lightvit"
    name: str
    embed_dims: tuple[int, int, int]
    depths: tuple[int, int, int]
    num_heads: tuple[int, int, int]
    num_tokens: int
    mlp_ratios: tuple[int, int, int] = (8, 4, 4)
    window: int = WINDOW
    neck_dim: int = 1280
    num_classes: int = 1000
    img_size: int = IMG_SIZE
    patch_stride: int = 8

    @property
    def resolutions(self) -> tuple[int, int, int]:
        """Token grid side per stage: 28, 14, 7 at 224 px."""
        side = self.img_size // self.patch_stride
        return side, side // 2, side // 4

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS: dict[str, LightViTConfig] = {
    "lightvit_tiny": LightViTConfig("lightvit_tiny", (64, 128, 256), (2, 6, 6), (2, 4, 8), 8),
    "lightvit_small": LightViTConfig("lightvit_small", (96, 192, 384), (2, 6, 6), (3, 6, 12), 16),
    "lightvit_base": LightViTConfig("lightvit_base", (128, 256, 512), (3, 8, 6), (4, 8, 16), 24),
}
ALIASES = {"LightViT-T": "lightvit_tiny", "LightViT-S": "lightvit_small", "LightViT-B": "lightvit_base",
           "lightvit-t": "lightvit_tiny", "lightvit-s": "lightvit_small", "lightvit-b": "lightvit_base"}


def get_config(name: str, num_classes: int | None = None) -> LightViTConfig:
    config = VARIANTS[name]
    return replace(config, num_classes=num_classes) if num_classes is not None else config
