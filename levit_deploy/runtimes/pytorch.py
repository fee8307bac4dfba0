"""PyTorch runtime: the reference or fused module in eager mode, on CPU or CUDA."""
from __future__ import annotations

import numpy as np
import torch

from .base import Runtime, RuntimeUnavailable

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, module: torch.nn.Module, device: str = "cpu", threads: int | None = 1,
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailable("torch runtime: device 'cuda' asked for, but PyTorch sees no CUDA GPU")
        if precision not in ("fp32", *AMP_DTYPES):
            raise ValueError(f"torch runtime precision must be fp32, fp16 or bf16, got {precision!r}")
        if threads is not None and device == "cpu":
            torch.set_num_threads(threads)  # process-wide in PyTorch: recorded in info()
        self.device = torch.device(device)
        self.precision = precision
        self.threads = threads
        self.module = module.to(self.device).eval()
        self.channels_last = channels_last
        self.compiled = compile
        self.forward = torch.compile(self.module) if compile else self.module

    @torch.inference_mode()
    def infer(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(self.check_batch(x)).to(self.device, non_blocking=True)
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        if self.precision in AMP_DTYPES:
            with torch.autocast(self.device.type, dtype=AMP_DTYPES[self.precision]):
                out = self.forward(t)
        else:
            out = self.forward(t)
        return out.float().cpu().numpy()

    def info(self) -> dict:
        return {"runtime": self.name, "module": type(self.module).__name__, "device": str(self.device),
                "precision": self.precision, "threads": torch.get_num_threads() if self.device.type == "cpu"
                else None, "torch": torch.__version__, "compile": self.compiled,
                "channels_last": self.channels_last,
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None}

    def close(self) -> None:
        self.module = self.forward = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
