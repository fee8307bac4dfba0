"""Time OpenVINO IRs side by side with nothing but openvino and numpy installed.

For machines where levit-deploy is not installed (a borrowed server with int8 dot-product instructions, say): the
same protocol as `levit-deploy bench` (batch 16, interleaved rounds, median with a bootstrap 95 % interval) and the
same CPU-plugin configuration as levit-deploy's OpenVINO runtime (f32 inference precision unless the IR is
quantized, latency hint, one stream, the given threads).

    python benchmarks/ov_ir_speed.py a.xml b.xml a.xml:bf16 --threads 1 --duration 20 --json out.json

``IR:bf16`` compiles that IR with bf16 inference precision (AMX/AVX-512 bf16 where the CPU has them) instead of f32.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import openvino as ov

ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu() -> dict:
    model, flags = platform.processor(), set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags.update(value.split())
    return {"model": model, "isa": [f for f in ISA if f in flags]}


def median_interval(t: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    medians = np.median(np.random.default_rng(0).choice(t, (resamples, t.size)), axis=1)
    return tuple(np.percentile(medians, [2.5, 97.5]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("irs", nargs="+", help="IR paths, each optionally followed by :bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--duration", type=float, default=20.0, help="timed seconds per IR")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    core = ov.Core()
    x = np.random.default_rng(1).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    compiled, times = {}, {}
    for ir in args.irs:
        path, _, hint = ir.partition(":")
        config = {"INFERENCE_PRECISION_HINT": hint or "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                  "INFERENCE_NUM_THREADS": str(args.threads)}
        started = time.perf_counter()
        compiled[ir] = core.compile_model(core.read_model(path), "CPU", config).create_infer_request()
        compiled[ir].infer({0: x})
        print(f"{ir}: compiled + first batch in {time.perf_counter() - started:.2f} s", flush=True)
        times[ir] = []
    for request in compiled.values():  # warm-up
        for _ in range(5):
            request.infer({0: x})
    while min(sum(t) for t in times.values()) < args.duration:
        for ir, request in compiled.items():
            for _ in range(3):
                t0 = time.perf_counter()
                request.infer({0: x})
                times[ir].append(time.perf_counter() - t0)
    rows = []
    for ir, t in times.items():
        t = np.asarray(t)
        lo, hi = median_interval(t)
        rows.append({"ir": ir, "calls": int(t.size), "images_per_s": args.batch / float(np.median(t)),
                     "images_per_s_ci": [args.batch / hi, args.batch / lo], "p50_ms": float(np.median(t)) * 1e3})
    base = rows[0]["images_per_s"]
    for r in rows:
        print(f"{r['ir']}: {r['images_per_s']:.1f} img/s (95% CI {r['images_per_s_ci'][0]:.1f}-"
              f"{r['images_per_s_ci'][1]:.1f}), p50 {r['p50_ms']:.1f} ms, {r['images_per_s'] / base:.2f}x the first")
    doc = {"cpu": cpu(), "openvino": ov.get_version(), "threads": args.threads, "batch": args.batch, "results": rows}
    print(json.dumps(doc["cpu"]))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
