"""levit-deploy: load LeViT checkpoints of any layout, fuse, export, run and benchmark them.

The public API mirrors the data flow: ``load`` -> ``fuse`` -> ``export`` -> ``open_runtime``, with
``compare`` checking parity at every arrow. Optional backends (ONNX Runtime, OpenVINO, CoreML,
TensorRT) are imported only when used.
"""
__version__ = "0.1.0"

from .checkpoints import CheckpointError, load  # noqa: E402
from .fuse import fuse  # noqa: E402
from .parity import ParityReport, compare  # noqa: E402


def export(model, to: str, out_dir, **options):
    """Fuse, export, parity-check and write an artifact with its manifest; see exporters.export."""
    from .exporters import export as _export

    return _export(model, to, out_dir, **options)


def open_runtime(path_or_model, runtime=None, device="cpu", threads=1, **options):
    """A Runtime for an artifact or a torch module; see runtimes.open_runtime."""
    from .runtimes import open_runtime as _open

    return _open(path_or_model, runtime, device, threads, **options)


__all__ = ["load", "fuse", "export", "open_runtime", "compare", "ParityReport", "CheckpointError",
           "__version__"]
