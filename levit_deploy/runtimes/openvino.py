"""OpenVINO runtime on CPU.

On CPUs with AMX or AVX-512 bf16, the CPU plugin runs fp32 models in bf16 unless told otherwise.
Here fp32 means fp32: INFERENCE_PRECISION_HINT is f32 unless the caller asks for bf16, and the
precision that actually ran (read back from the compiled model) sets the parity tolerance.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .base import Runtime, require

HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


@lru_cache(maxsize=1)
def shared_core():
    """One ov.Core per process: creating many crashes OpenVINO (a segfault after a few dozen, seen in
    this test suite and in ultralytics/ultralytics#25864)."""
    return require("openvino", "the 'openvino' runtime").Core()


class OpenVinoRuntime(Runtime):
    name = "openvino"

    def __init__(self, path: str, device: str = "cpu", threads: int | None = 1, precision: str = "fp32",
                 inference_precision: str | None = None, performance_hint: str = "LATENCY"):
        ov = require("openvino", "the 'openvino' runtime")
        self.ov = ov
        self.path = str(path)
        ov_device = {"cpu": "CPU", "gpu": "GPU"}.get(device, device.upper())
        compute = inference_precision or "fp32"
        if compute not in HINTS:
            raise ValueError(f"openvino inference precision must be fp32, bf16 or fp16, got {compute!r}")
        config = {"INFERENCE_PRECISION_HINT": HINTS[compute], "PERFORMANCE_HINT": performance_hint,
                  "NUM_STREAMS": 1}
        if threads is not None and ov_device == "CPU":
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = shared_core().compile_model(self.path, ov_device, config)
        self.request = self.compiled.create_infer_request()
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        names = {ov.Type.f32: "fp32", ov.Type.bf16: "bf16", ov.Type.f16: "fp16"}
        self.inference_precision = names.get(ran, str(ran))
        # tolerance follows what ran: bf16 compute, or fp16-stored weights, are judged as half precision
        self.precision = self.inference_precision if self.inference_precision != "fp32" else precision
        self.threads, self.device = threads, ov_device
        self.config = config

    def infer(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: self.check_batch(x)})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)

    def info(self) -> dict:
        return {"runtime": self.name, "path": self.path, "openvino": self.ov.__version__, "device": self.device,
                "threads": self.compiled.get_property("INFERENCE_NUM_THREADS") if self.device == "CPU" else None,
                "inference_precision": self.inference_precision, "precision": self.precision,
                "config": self.config}

    def close(self) -> None:
        self.request = self.compiled = None
