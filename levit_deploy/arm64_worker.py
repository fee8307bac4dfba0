"""Run an ONNX artifact (or a torch.export program) on this process's CPU and report outputs, timings and the CPU's features.

A standalone script (it imports only numpy and onnxruntime, or torch for ``.pt2`` files), because
under emulation it runs inside an aarch64 Python that has nothing else. Invoked by
levit_deploy.arm64 as ``python arm64_worker.py MODEL INPUTS.npy OUT.npz [options]``; prints one JSON
document on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import time

import numpy as np

# AT_HWCAP / AT_HWCAP2 bits of the Linux arm64 ABI (arch/arm64/include/uapi/asm/hwcap.h)
HWCAP_BITS = {"asimd": 1 << 1, "sve": 1 << 22}
HWCAP2_BITS = {"sve2": 1 << 1, "i8mm": 1 << 13, "bf16": 1 << 14}
# MIDR part numbers of the Arm cores inside AWS Graviton 2, 3 and 4
ARM_PARTS = {"0xd0c": "Neoverse-N1 (Graviton2)", "0xd40": "Neoverse-V1 (Graviton3)",
             "0xd4f": "Neoverse-V2 (Graviton4)"}


def cpu_features() -> dict:
    """CPU model and arm64 features from the auxiliary vector (qemu-user emulates it too)."""
    info = {"machine": platform.machine(), "model": None, "features": []}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "cpu part" and info["model"] is None:
                info["model"] = ARM_PARTS.get(value.strip(), f"Arm part {value.strip()}")
            elif key == "model name" and info["model"] is None:
                info["model"] = value.strip()
    except OSError:
        pass
    try:
        data = open("/proc/self/auxv", "rb").read()
        aux = dict(struct.iter_unpack("<QQ", data[: len(data) // 16 * 16]))
        hw, hw2 = aux.get(16, 0), aux.get(26, 0)
        if platform.machine() in ("aarch64", "arm64"):
            info["features"] = sorted([n for n, b in HWCAP_BITS.items() if hw & b] +
                                      [n for n, b in HWCAP2_BITS.items() if hw2 & b])
            if "asimd" in info["features"]:
                info["features"].append("neon")
    except OSError:
        pass
    return info


def open_onnx(path: str, threads: int, config: dict[str, str]):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return (lambda x: sess.run(None, {name: x})[0]), {"onnxruntime": ort.__version__}


def open_torch(path: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    module = torch.export.load(path).module()

    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    return run, {"torch": torch.__version__, "mkldnn_fpmath": os.environ.get("DNNL_DEFAULT_FPMATH_MODE")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("inputs")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--config", action="append", default=[], help="onnxruntime session config KEY=VALUE")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--duration", type=float, default=0.0, help="timed seconds (0: parity only)")
    ap.add_argument("--warmup", type=float, default=2.0)
    args = ap.parse_args()
    config = dict(kv.split("=", 1) for kv in args.config)
    if args.model.endswith(".pt2"):
        run, versions = open_torch(args.model, args.threads)
    else:
        run, versions = open_onnx(args.model, args.threads, config)
    inputs = np.load(args.inputs)
    outputs = np.concatenate([run(inputs[i:i + args.batch]) for i in range(0, len(inputs), args.batch)])
    np.savez(args.out, logits=outputs)
    timing = None
    if args.duration > 0:
        x = np.ascontiguousarray(np.resize(inputs, (args.batch, *inputs.shape[1:])), dtype=np.float32)
        end = time.perf_counter() + args.warmup
        while time.perf_counter() < end:
            run(x)
        times, spent = [], 0.0
        while spent < args.duration or len(times) < 5:
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
            spent += times[-1]
        t = np.asarray(times)
        p10, p50, p90, p99 = np.percentile(t, [10, 50, 90, 99])
        timing = {"batch": args.batch, "images_per_s": args.batch / p50, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3,
                  "p99_ms": p99 * 1e3, "spread": p90 / p10, "calls": len(t)}
    print(json.dumps({"cpu": cpu_features(), "python": platform.python_version(), "threads": args.threads,
                      "session_config": config, "versions": versions, "timing": timing}))


if __name__ == "__main__":
    main()
