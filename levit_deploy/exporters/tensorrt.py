"""TensorRT engine from the fused ONNX graph (TensorRT 10 Python API).

An optimisation profile spans the batch axis (1 .. max, tuned for opt), precision flags follow
--precision (fp32 also turns TF32 off, so fp32 means fp32), and a timing cache per GPU and TensorRT
version is reused across builds. An engine is only valid on the GPU model and TensorRT version it
was built with; both are recorded, and the runtime refuses anything else.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..checkpoints import cache_dir
from ..manifest import write_atomic
from ..runtimes.base import RuntimeUnavailable, require
from . import ExportError, ExportOptions, StagedArtifact
from . import onnx as onnx_exporter

WORKSPACE_BYTES = 4 << 30


def gpu_identity() -> dict:
    if not torch.cuda.is_available():
        raise RuntimeUnavailable("TensorRT needs an NVIDIA GPU, and PyTorch sees no CUDA device on this machine")
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def write(model: torch.nn.Module, staging: Path, opts: ExportOptions) -> StagedArtifact:
    trt = require("tensorrt", "TensorRT export")
    identity = gpu_identity()
    if opts.precision not in ("fp32", "fp16", "bf16"):
        raise ExportError(f"TensorRT export supports fp32, fp16 and bf16, not {opts.precision}")
    if opts.batch == "dynamic":
        max_batch = int(opts.extra.get("max_batch") or 256)
        opt_batch = min(int(opts.extra.get("opt_batch") or 64), max_batch)
    else:
        max_batch = opt_batch = int(opts.batch)
    onnx_dir = staging / "onnx"
    onnx_dir.mkdir()
    staged = onnx_exporter.write(model, onnx_dir, dataclasses.replace(opts, precision="fp32", batch="dynamic"))
    onnx_bytes = (onnx_dir / staged.file).read_bytes()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse the fused ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if opts.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)
    else:
        config.set_flag(trt.BuilderFlag.FP16 if opts.precision == "fp16" else trt.BuilderFlag.BF16)
    size = model.config.img_size
    profile = builder.create_optimization_profile()
    profile.set_shape("pixel_values", (1, 3, size, size), (opt_batch, 3, size, size), (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    cache_file = cache_dir() / "tensorrt" / f"timing-{identity['gpu'].replace(' ', '_')}-trt{trt.__version__}.cache"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    timing = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    (staging / "model.engine").write_bytes(bytes(engine))
    write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    for f in onnx_dir.iterdir():
        f.unlink()
    onnx_dir.rmdir()
    details = {**identity, "tensorrt": trt.__version__, "profile": {"min": 1, "opt": opt_batch, "max": max_batch},
               "timing_cache": str(cache_file)}
    return StagedArtifact(file="model.engine", runtime="tensorrt", details=details,
                          runtime_options={"built_for": {"gpu": identity["gpu"], "tensorrt": trt.__version__}})
