"""PyTorch runtime: the reference or fused module in eager mode, on CPU or CUDA."""
from __future__ import annotations

import torch

from .base import Runtime, RuntimeUnavailable

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, module: torch.nn.Module, device: str = "cpu", threads: int | None = 1,
                 precision: str = "fp32", channels_last: bool = False, compile: bool = False,
                 cuda_graph: bool = False):
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
        if cuda_graph and self.device.type != "cuda":
            raise ValueError("cuda_graph needs device 'cuda'")
        self.cuda_graph = cuda_graph
        self.graphs: dict[tuple, tuple] = {}  # input shape -> (graph, static input, static output)
        self.forward = torch.compile(self.module) if compile else self.module

    def _run(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        if self.precision in AMP_DTYPES:
            with torch.autocast(self.device.type, dtype=AMP_DTYPES[self.precision]):
                return self.forward(t)
        return self.forward(t)

    def _replay(self, t: torch.Tensor) -> torch.Tensor:
        """Capture one CUDA graph per input shape, then replay it: no per-kernel launch overhead."""
        key = tuple(t.shape)
        if key not in self.graphs:
            static_in = t.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._run(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._run(static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(t)
        graph.replay()
        return static_out

    @torch.inference_mode()
    def infer(self, x):
        """numpy in -> numpy logits; a torch tensor in -> tensor out on the device (no host copies)."""
        on_device = isinstance(x, torch.Tensor)
        t = x if on_device else torch.from_numpy(self.check_batch(x))
        t = t.to(self.device, non_blocking=True)
        out = self._replay(t) if self.cuda_graph else self._run(t)
        if on_device:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the paper's protocol: synchronise after every call
            return out
        return out.float().cpu().numpy()

    def info(self) -> dict:
        return {"runtime": self.name, "module": type(self.module).__name__, "device": str(self.device),
                "precision": self.precision, "threads": torch.get_num_threads() if self.device.type == "cpu"
                else None, "torch": torch.__version__, "compile": self.compiled,
                "channels_last": self.channels_last, "cuda_graph": self.cuda_graph,
                "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None}

    def close(self) -> None:
        self.module = self.forward = None
        self.graphs.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
