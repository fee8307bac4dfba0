"""LeViT definition and the variant registry (levit_128s ... levit_384)."""
from .config import VARIANTS, LevitConfig, get_config, resolve_variant_name
from .levit import Levit, count_flops, count_parameters


def create_model(name: str, num_classes: int | None = None, distilled: bool | None = None) -> Levit:
    """A freshly initialised reference model of a named variant, in eval mode."""
    return Levit(get_config(name, num_classes, distilled)).eval()


__all__ = ["VARIANTS", "LevitConfig", "Levit", "create_model", "get_config", "resolve_variant_name",
           "count_flops", "count_parameters"]
