"""PyTorch: a module (the reference or the fused model) run eagerly on CPU or CUDA. No exporter: the
``torch`` runtime is how bench and predict run a model without exporting it."""
from __future__ import annotations

import torch

from .base import Backend, Runtime, RuntimeConfig, RuntimeUnavailable

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TorchRuntime(Runtime):
    name = "torch"
    accepts_device_tensors = True

    def __init__(self, module: torch.nn.Module, config: RuntimeConfig = RuntimeConfig(),
                 channels_last: bool = False, compile: bool = False, cuda_graph: bool = False):
        super().__init__(module, config)
        if self.compute not in ("fp32", *AMP_DTYPES):
            raise ValueError(f"torch runtime computes in fp32, fp16 or bf16 (autocast), not {self.compute!r}")
        if cuda_graph and not self.device.startswith("cuda"):
            raise ValueError("cuda_graph needs device 'cuda'")
        self.precision = self.compute  # autocast: parity judges by the compute precision
        self.channels_last, self.compiled, self.cuda_graph = channels_last, compile, cuda_graph
        self.graphs: dict[tuple, tuple] = {}  # input shape -> (graph, static input, static output)

    def _open(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeUnavailable("torch runtime: device 'cuda' asked for, but PyTorch sees no CUDA GPU")
        if self.threads is not None and self.device == "cpu":
            torch.set_num_threads(self.threads)  # process-wide in PyTorch: recorded in info()
        self.torch_device = torch.device(self.device)
        self.module = self.source.to(self.torch_device).eval()
        self.forward = torch.compile(self.module) if self.compiled else self.module

    def _run(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        if self.compute in AMP_DTYPES:
            with torch.autocast(self.torch_device.type, dtype=AMP_DTYPES[self.compute]):
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
    def _infer(self, x):
        """numpy in -> numpy outputs; a torch tensor in -> tensor out on the device (no host copies)."""
        on_device = isinstance(x, torch.Tensor)
        t = (x if on_device else torch.from_numpy(x)).to(self.torch_device, non_blocking=True)
        out = self._replay(t) if self.cuda_graph else self._run(t)
        if on_device:
            if self.torch_device.type == "cuda":
                torch.cuda.synchronize(self.torch_device)  # the paper's protocol: synchronise after every call
            return out
        return out.float().cpu().numpy()

    def _info(self) -> dict:
        cuda = self.torch_device.type == "cuda"
        return {"module": type(self.module).__name__, "torch": torch.__version__, "compile": self.compiled,
                "threads": None if cuda else torch.get_num_threads(), "channels_last": self.channels_last,
                "cuda_graph": self.cuda_graph, "gpu": torch.cuda.get_device_name(self.torch_device) if cuda else None}

    def _close(self) -> None:
        self.module = self.forward = None
        self.graphs.clear()
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()


BACKEND = Backend(name="torch", runtime="torch", description="a PyTorch module, run eagerly (no export)",
                  runtime_class=TorchRuntime, compute_precisions=("fp32", "fp16", "bf16"))
