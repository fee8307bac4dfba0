"""TensorRT runtime: a deserialised engine bound by tensor address on a CUDA stream.

CUDA memory and streams come from PyTorch (already a dependency), so no cuda-python is needed.
"""
from __future__ import annotations

import torch

from .base import Runtime, RuntimeUnavailable, require


class TensorRtRuntime(Runtime):
    name = "tensorrt"

    def __init__(self, path: str, device: str = "cuda", threads: int | None = None, precision: str = "fp32",
                 built_for: dict | None = None):
        trt = require("tensorrt", "the 'tensorrt' runtime")
        if not torch.cuda.is_available():
            raise RuntimeUnavailable("tensorrt runtime: no CUDA GPU visible to PyTorch on this machine")
        gpu = torch.cuda.get_device_name(0)
        if built_for and (built_for.get("gpu") != gpu or built_for.get("tensorrt") != trt.__version__):
            raise RuntimeUnavailable(f"{path}: engine built for {built_for.get('gpu')} with TensorRT "
                                     f"{built_for.get('tensorrt')}; this machine has {gpu} with TensorRT "
                                     f"{trt.__version__}. Engines are not portable: re-export it here")
        self.trt, self.path, self.precision, self.gpu = trt, str(path), precision, gpu
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(open(path, "rb").read())
        if self.engine is None:
            raise RuntimeUnavailable(f"{path}: TensorRT could not deserialise the engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        lo, opt, hi = self.engine.get_tensor_profile_shape(self.input, 0)
        self.min_batch, self.opt_batch, self.max_batch = lo[0], opt[0], hi[0]
        self.stream = torch.cuda.Stream()

    def infer(self, x):
        """numpy in -> numpy out; a CUDA tensor in -> CUDA tensor out (no host copies, for benchmarks)."""
        on_device = isinstance(x, torch.Tensor)
        if not on_device:
            x = torch.from_numpy(self.check_batch(x))
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

    def info(self) -> dict:
        return {"runtime": self.name, "path": self.path, "tensorrt": self.trt.__version__, "gpu": self.gpu,
                "precision": self.precision, "profile": [self.min_batch, self.opt_batch, self.max_batch]}

    def close(self) -> None:
        self.context = self.engine = None
        torch.cuda.empty_cache()
