"""ONNX Runtime: CPU (MLAS) by default; CUDA and TensorRT execution providers when asked for."""
from __future__ import annotations

import numpy as np

from .base import Runtime, RuntimeUnavailable, require

PROVIDERS = {"cpu": ["CPUExecutionProvider"],
             "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


class OrtRuntime(Runtime):
    name = "ort"

    def __init__(self, path: str, device: str = "cpu", threads: int | None = 1, precision: str = "fp32",
                 provider: str | None = None, optimization: str = "all",
                 session_config: dict[str, str] | None = None):
        ort = require("onnxruntime", "the 'ort' runtime")
        self.ort = ort
        provider = provider or ("cuda" if device.startswith("cuda") else "cpu")
        wanted = PROVIDERS[provider]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise RuntimeUnavailable(f"ort runtime: {wanted[0]} is not available in this onnxruntime "
                                     f"(available: {', '.join(available)}); install onnxruntime-gpu for "
                                     f"CUDA/TensorRT")
        opts = ort.SessionOptions()
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        opts.graph_optimization_level = levels[optimization]
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        for key, value in (session_config or {}).items():
            opts.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(path), sess_options=opts,
                                            providers=[p for p in wanted if p in available])
        self.input_name = self.session.get_inputs()[0].name
        self.path, self.threads, self.precision = str(path), threads, precision
        self.optimization, self.session_config = optimization, dict(session_config or {})

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: self.check_batch(x)})[0].astype(np.float32, copy=False)

    def info(self) -> dict:
        return {"runtime": self.name, "path": self.path, "onnxruntime": self.ort.__version__,
                "providers": self.session.get_providers(), "threads": self.threads,
                "graph_optimization": self.optimization, "session_config": self.session_config,
                "precision": self.precision}

    def close(self) -> None:
        self.session = None
