"""The three LITv2 variants (Pan et al. 2022, "Fast Vision Transformers with HiLo Attention"; the official
``configs/litv2-{small,medium,base}.yaml``) as plain data."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar

IMG_SIZE = 224


@dataclass(frozen=True)
class LITv2Config:
    """Hyper-parameters of one LITv2. Stage s has width embed_dim·2^s, depths[s] blocks and num_heads[s]
    heads; stages whose local_ws is 0 have no attention (ConvFFN blocks), the others HiLo attention with
    a fraction ``alpha`` of the heads on the low-frequency path."""

    family: ClassVar[str] = "litv2"
    name: str
    embed_dim: int
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    alpha: float = 0.9
    local_ws: tuple[int, int, int, int] = (0, 0, 2, 1)
    mlp_ratio: int = 4
    num_classes: int = 1000
    img_size: int = IMG_SIZE
    patch_size: int = 4

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return tuple(self.embed_dim * 2 ** s for s in range(4))

    @property
    def resolutions(self) -> tuple[int, int, int, int]:
        """Token grid side per stage: 56, 28, 14, 7 at 224 px."""
        side = self.img_size // self.patch_size
        return tuple(side >> s for s in range(4))

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS: dict[str, LITv2Config] = {
    "litv2_s": LITv2Config("litv2_s", 96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "litv2_m": LITv2Config("litv2_m", 96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "litv2_b": LITv2Config("litv2_b", 128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
ALIASES = {"LITv2-S": "litv2_s", "LITv2-M": "litv2_m", "LITv2-B": "litv2_b",
           "litv2_small": "litv2_s", "litv2_medium": "litv2_m", "litv2_base": "litv2_b"}


def get_config(name: str, num_classes: int | None = None) -> LITv2Config:
    config = VARIANTS[name]
    return replace(config, num_classes=num_classes) if num_classes is not None else config
