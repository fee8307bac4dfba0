"""The five LeViT variants of the paper (Table 2) as plain data.

Everything about a variant's shape is derived from these few numbers, so the loader can detect
a variant by comparing tensor shapes with what a config predicts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

IMG_SIZE = 224
PATCH_STRIDE = 16  # four stride-2 convolutions: 224 px -> 14x14 tokens


@dataclass(frozen=True)
class LevitConfig:
    """Hyper-parameters of one LeViT model.

    embed_dims: C per stage; key_dim: D; num_heads: N per stage; depths: X per stage.
    Shrink attention into stage s+1 uses embed_dims[s] // key_dim heads, attention ratio 4 and
    stride 2; every MLP has ratio 2; normal attention has V = 2·D.
    """

    family: ClassVar[str] = "levit"
    name: str
    embed_dims: tuple[int, int, int]
    key_dim: int
    num_heads: tuple[int, int, int]
    depths: tuple[int, int, int]
    num_classes: int = 1000
    distilled: bool = True
    attn_ratio: int = 2
    mlp_ratio: int = 2
    down_attn_ratio: int = 4
    down_mlp_ratio: int = 2
    img_size: int = IMG_SIZE

    @property
    def down_heads(self) -> tuple[int, int]:
        return tuple(c // self.key_dim for c in self.embed_dims[:-1])  # type: ignore[return-value]

    @property
    def resolutions(self) -> tuple[int, int, int]:
        """Token grid side per stage: 14, 7, 4 at 224 px (stride-2 subsampling keeps the odd row)."""
        r = [self.img_size // PATCH_STRIDE]
        for _ in range(2):
            r.append((r[-1] - 1) // 2 + 1)
        return tuple(r)  # type: ignore[return-value]

    def replace(self, **changes) -> "LevitConfig":
        values = asdict(self)
        values.update(changes)
        for key in ("embed_dims", "num_heads", "depths"):
            values[key] = tuple(values[key])
        return LevitConfig(**values)

    def to_dict(self) -> dict:
        return asdict(self)


VARIANTS: dict[str, LevitConfig] = {
    "levit_128s": LevitConfig("levit_128s", (128, 256, 384), 16, (4, 6, 8), (2, 3, 4)),
    "levit_128": LevitConfig("levit_128", (128, 256, 384), 16, (4, 8, 12), (4, 4, 4)),
    "levit_192": LevitConfig("levit_192", (192, 288, 384), 32, (3, 5, 6), (4, 4, 4)),
    "levit_256": LevitConfig("levit_256", (256, 384, 512), 32, (4, 6, 8), (4, 4, 4)),
    "levit_384": LevitConfig("levit_384", (384, 512, 768), 32, (6, 9, 12), (4, 4, 4)),
}

# Names users type for the same variants (paper spelling, Hugging Face repo names).
ALIASES = {
    **{name.replace("levit_", "levit-"): name for name in VARIANTS},
    "levit-128S": "levit_128s",
    "LeViT-128S": "levit_128s",
    "LeViT-128": "levit_128",
    "LeViT-192": "levit_192",
    "LeViT-256": "levit_256",
    "LeViT-384": "levit_384",
}


def resolve_variant_name(name: str) -> str | None:
    """Canonical variant name for a user-typed one, or None if it names no variant."""
    if name in VARIANTS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    lowered = name.lower().replace("-", "_")
    for prefix in ("levit_conv_",):
        if lowered.startswith(prefix):
            lowered = "levit_" + lowered[len(prefix):]
    return lowered if lowered in VARIANTS else None


def get_config(name: str, num_classes: int | None = None, distilled: bool | None = None) -> LevitConfig:
    canonical = resolve_variant_name(name)
    if canonical is None:
        raise KeyError(f"unknown LeViT variant {name!r}; known: {', '.join(VARIANTS)}")
    cfg = VARIANTS[canonical]
    changes = {}
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if distilled is not None:
        changes["distilled"] = distilled
    return cfg.replace(**changes) if changes else cfg
