"""TensorRT engine from the fused ONNX graph, run on a CUDA stream. TensorRT 10 and 11, one code path.

TensorRT 11 removed weak typing (``BuilderFlag.FP16``/``BF16``/``INT8``, the precision constraints, the
calibrator): a network computes in the types its graph declares. So every engine is built from a strongly
typed network, and the precision comes from the graph: fp16 and bf16 engines from the fp16 / bf16 ONNX
graphs the ONNX exporter writes (float32 interface kept), fp32 from the fp32 graph with TF32 off, so fp32
means fp32. TensorRT 10 builds the same way (its ``STRONGLY_TYPED`` network flag; 11 needs none).

Every TensorRT name used here is checked against the installed module before anything runs
(:func:`check_api`), so an API drift is one line naming what is missing, not an AttributeError mid-build.
An optimisation profile spans the batch axis (1 .. max, tuned for opt) and a timing cache per GPU and
TensorRT version is reused. An engine is only valid on the GPU model and TensorRT version it was built
with; both are recorded, and the runtime refuses anything else.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..env import cache_dir, write_atomic
from ..probe import run_in_chunks
from .base import Backend, ExportError, Runtime, RuntimeConfig, RuntimeUnavailable, StagedArtifact
from .onnx import OnnxOptions, OnnxProbe, write_onnx

WORKSPACE_BYTES = 4 << 30
SUPPORTED_MAJORS = (10, 11)
#: every module attribute this file uses (classes, enum members, methods looked up on their classes)
USED_NAMES = (
    "Logger", "Logger.WARNING", "Builder", "Builder.create_network", "Builder.create_builder_config",
    "Builder.create_optimization_profile", "Builder.build_serialized_network", "OnnxParser", "OnnxParser.parse",
    "OnnxParser.get_error", "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.clear_flag",
    "IBuilderConfig.add_optimization_profile", "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache", "IOptimizationProfile.set_shape",
    "ITimingCache.serialize", "MemoryPoolType.WORKSPACE", "BuilderFlag.TF32", "Runtime",
    "Runtime.deserialize_cuda_engine", "ICudaEngine.create_execution_context", "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_profile_shape", "ICudaEngine.get_tensor_shape",
    "ICudaEngine.num_io_tensors", "TensorIOMode.INPUT", "TensorIOMode.OUTPUT", "IExecutionContext.set_input_shape",
    "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3",
    "IExecutionContext.get_tensor_shape", "ICudaEngine.get_tensor_dtype", "float32", "float16", "bfloat16",
)


def check_api(trt) -> None:
    """One line naming every TensorRT attribute this backend needs that the installed version lacks."""
    version = getattr(trt, "__version__", "?")
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    if major not in SUPPORTED_MAJORS:
        raise RuntimeUnavailable(f"TensorRT {version} is installed; levit-deploy supports TensorRT 10.x and 11.x: "
                                 f"pip install 'tensorrt>=10,<12'")
    missing = []
    for name in USED_NAMES:
        obj = trt
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                missing.append(name)
                break
    if major == 10 and not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        missing.append("NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    if missing:
        raise RuntimeUnavailable(f"TensorRT {version} lacks {', '.join(missing)}, which levit-deploy's TensorRT "
                                 f"backend uses; supported: TensorRT 10.x and 11.x")


def strongly_typed_flags(trt) -> int:
    """Network creation flags: STRONGLY_TYPED where it exists (TensorRT 10); 11 is always strongly typed."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None and int(trt.__version__.split(".")[0]) < 11 else 0


@dataclass
class TensorrtOptions:
    max_batch: int = field(default=256, metadata={"help": "largest batch of the optimisation profile"})
    opt_batch: int = field(default=64, metadata={"help": "batch the engine is tuned for"})


def gpu_identity() -> dict:
    if not torch.cuda.is_available():
        raise RuntimeUnavailable("TensorRT needs an NVIDIA GPU, and PyTorch sees no CUDA device on this machine")
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def write(model: torch.nn.Module, staging: Path, opts) -> StagedArtifact:
    trt = BACKEND.require("TensorRT export")
    check_api(trt)
    identity = gpu_identity()
    if opts.batch == "dynamic":
        max_batch = opts.target.max_batch
        opt_batch = min(opts.target.opt_batch, max_batch)
    else:
        max_batch = opt_batch = int(opts.batch)
    onnx_dir = staging / "onnx"
    onnx_dir.mkdir()
    # the graph's types are the engine's; opset 19, which every TensorRT 10 and 11 parser reads
    staged = write_onnx(model, onnx_dir, opts.precision, "dynamic", OnnxOptions(opset=19))
    engine, cache_file = build_engine(trt, (onnx_dir / staged.file).read_bytes(), model.config.img_size, opt_batch,
                                      max_batch, identity["gpu"])
    (staging / "model.engine").write_bytes(engine)
    for f in onnx_dir.iterdir():
        f.unlink()
    onnx_dir.rmdir()
    details = {**identity, "tensorrt": trt.__version__, "strongly_typed": True, "graph_precision": opts.precision, "profile": {"min": 1, "opt": opt_batch, "max": max_batch},
               "timing_cache": str(cache_file)}
    return StagedArtifact(file="model.engine", details=details,
                          runtime_options={"built_for": {"gpu": identity["gpu"], "tensorrt": trt.__version__}})


def build_engine(trt, onnx_bytes: bytes, size: int, opt_batch: int, max_batch: int, gpu: str) -> tuple[bytes, Path]:
    """(engine, timing cache file): an ONNX graph built as every engine we ship — strongly typed, TF32 off, one
    optimisation profile over the batch axis (1 .. max, tuned for opt), the timing cache of this GPU and TensorRT
    reused and updated."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse the fused ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    config.clear_flag(trt.BuilderFlag.TF32)  # float32 layers stay float32; fp16/bf16 come from the graph
    profile = builder.create_optimization_profile()
    profile.set_shape("pixel_values", (1, 3, size, size), (opt_batch, 3, size, size), (max_batch, 3, size, size))
    config.add_optimization_profile(profile)
    cache_file = cache_dir() / "tensorrt" / f"timing-{gpu.replace(' ', '_')}-trt{trt.__version__}.cache"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    timing = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
    write_atomic(cache_file, bytes(config.get_timing_cache().serialize()))
    return bytes(engine), cache_file


class TensorRtRuntime(Runtime):
    """A deserialised engine bound by tensor address on a CUDA stream; CUDA memory and streams come from
    PyTorch (already a dependency), so no cuda-python is needed."""

    name = "tensorrt"
    accepts_device_tensors = True

    def __init__(self, path, config: RuntimeConfig = RuntimeConfig(device="cuda", threads=None),
                 built_for: dict | None = None):
        super().__init__(path, config)
        self.built_for = built_for

    def _open(self) -> None:
        trt = BACKEND.require("the 'tensorrt' runtime")
        check_api(trt)
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("tensorrt runtime: no CUDA GPU visible to PyTorch on this machine")
        gpu = torch.cuda.get_device_name(0)
        built_for = self.built_for
        if built_for and (built_for.get("gpu") != gpu or built_for.get("tensorrt") != trt.__version__):
            raise RuntimeUnavailable(f"{self.path}: engine built for {built_for.get('gpu')} with TensorRT "
                                     f"{built_for.get('tensorrt')}; this machine has {gpu} with TensorRT "
                                     f"{trt.__version__}. Engines are not portable: re-export it here")
        self.trt, self.gpu = trt, gpu
        with open(self.path, "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeUnavailable(f"{self.path}: TensorRT could not deserialise the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        lo, opt, hi = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.opt_batch, self.max_batch = lo[0], opt[0], hi[0]
        self.stream = torch.cuda.Stream()

    def _infer(self, x):
        """numpy in -> numpy out; a CUDA tensor in -> CUDA tensor out (no host copies, for benchmarks)."""
        on_device = isinstance(x, torch.Tensor)
        if not on_device:
            x = torch.from_numpy(x)
        b = x.shape[0]
        if not self.min_batch <= b <= self.max_batch:
            raise ValueError(f"batch {b} is outside the engine's profile [{self.min_batch}, {self.max_batch}]; "
                             f"re-export with --max-batch")
        inp = x.to("cuda", torch.float32, non_blocking=True).contiguous()
        out_shape = (b, *self.engine.get_tensor_shape(self.output)[1:])
        out = torch.empty(out_shape, dtype=torch.float32, device="cuda")
        self.context.set_input_shape(self.input, tuple(inp.shape))
        self.context.set_tensor_address(self.input, inp.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        self.stream.synchronize()
        return out if on_device else out.cpu().numpy()

    def _info(self) -> dict:
        return {"tensorrt": self.trt.__version__, "gpu": self.gpu,
                "profile": [self.min_batch, self.opt_batch, self.max_batch]}

    def _close(self) -> None:
        self.context = self.engine = None
        torch.cuda.empty_cache()


class TensorRtProbe(OnnxProbe):
    """An engine can be neither cut nor read back: its weights are baked into the kernels TensorRT chose. A prefix
    is the fused ONNX graph the export builds from — written again from the deployed model at the engine's graph
    precision, cut as the ONNX probe cuts it — built with the shipped engine's configuration (``build_engine``,
    its batch profile) on this GPU and run there. It finds where TensorRT's build departs from the model (a
    precision, a kernel, a fusion), not bytes changed in the engine file after its export; the full run that
    shows the divergence is the shipped engine's own."""

    def __init__(self, folder: Path, manifest: dict, deploy: torch.nn.Module):
        self.trt = BACKEND.require("--locate")
        check_api(self.trt)
        self.gpu = gpu_identity()["gpu"]
        artifact = manifest["artifact"]
        self.size, self.opt, self.max = deploy.config.img_size, artifact["profile"]["opt"], artifact["profile"]["max"]
        with tempfile.TemporaryDirectory() as tmp:
            staged = write_onnx(deploy, Path(tmp), artifact["graph_precision"], "dynamic", OnnxOptions(opset=19))
            self.load(Path(tmp) / staged.file)

    def run(self, tensors: list[str], inputs: np.ndarray) -> list[np.ndarray]:
        trt = self.trt
        engine_bytes, _ = build_engine(trt, self.prefix(tensors).SerializeToString(), self.size, self.opt,
                                       self.max, self.gpu)
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_bytes)
        context, stream = engine.create_execution_context(), torch.cuda.Stream()
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}

        def execute(chunk: np.ndarray) -> list[np.ndarray]:
            x = torch.from_numpy(chunk).to("cuda")
            context.set_input_shape("pixel_values", tuple(x.shape))
            context.set_tensor_address("pixel_values", x.data_ptr())
            outs = [torch.empty(tuple(context.get_tensor_shape(t)), dtype=dtypes[engine.get_tensor_dtype(t)],
                                device="cuda") for t in tensors]
            for t, out in zip(tensors, outs):
                context.set_tensor_address(t, out.data_ptr())
            stream.wait_stream(torch.cuda.current_stream())
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError("TensorRT execution of a prefix failed")
            stream.synchronize()
            return [out.double().cpu().numpy() for out in outs]
        return run_in_chunks(execute, inputs, min(16, self.max))


BACKEND = Backend(
    name="tensorrt", runtime="tensorrt", description="TensorRT engine for one NVIDIA GPU model",
    runtime_class=TensorRtRuntime, module="tensorrt", extra="tensorrt", packages=("onnx", "tensorrt"),
    suffixes=(".engine", ".plan"), precisions=("fp32", "fp16", "bf16"), options=TensorrtOptions, write=write,
    needs="gpu", probe=TensorRtProbe)
