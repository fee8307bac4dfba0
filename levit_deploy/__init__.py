"""levit-deploy: load efficient vision transformers (LeViT, LightViT, LITv2) from any of their checkpoint
layouts, fuse, export, run and benchmark them.

The public API mirrors the data flow: ``load`` -> ``fuse`` -> ``export`` -> ``open_runtime``, with
``compare`` judging every arrow against one reference set (``build_reference_set``). Optional
backends (ONNX Runtime, OpenVINO, Core ML, TensorRT, ExecuTorch) are imported only when used.
"""
__version__ = "0.1.0"

from .backends import open_runtime  # noqa: E402
from .checkpoints import CheckpointError, load  # noqa: E402
from .export import export  # noqa: E402
from .fuse import fuse  # noqa: E402
from .parity import ParityReport, compare  # noqa: E402
from .reference import ReferenceSet, build_reference_set  # noqa: E402

__all__ = ["load", "fuse", "export", "open_runtime", "compare", "build_reference_set", "ReferenceSet",
           "ParityReport", "CheckpointError", "__version__"]
