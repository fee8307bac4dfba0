"""The LeViT paper's CPU protocol (its Table 3 column), for every family: one thread, batch 16, side by side.

For each variant, in one interleaved run: the unfused PyTorch eager model (what a user has), ONNX
Runtime on a plain export of the unfused model (what Optimum/timm give), and levit-deploy's fp32
artifacts in ONNX Runtime and OpenVINO. "Best" is the faster of our artifacts. The roofline is
images/s if every multiply-add ran at this core's measured single-thread sgemm rate. The paper column
is LeViT's published Xeon 6138 figure; no LightViT or LITv2 paper reports a CPU figure ("-").

Usage: python benchmarks/paper_table3.py [--duration 10] [--variants levit_128s lightvit_tiny ...] [--out table.md]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from levit_deploy import bench
from levit_deploy.checkpoints import load
from levit_deploy.env import fingerprint
from levit_deploy.families import all_variants, family_of
from levit_deploy.reference import build_reference_set

PAPER_INTEL = {"levit_128s": 131.1, "levit_128": 94.0, "levit_192": 65.0, "levit_256": 42.5, "levit_384": 23.1}


def sgemm_gflops(n: int = 1024, seconds: float = 3.0) -> float:
    """Single-thread fp32 matrix-multiply rate (median of repeated n×n×n products), in GFLOP/s."""
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times)) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=all_variants())
    ap.add_argument("--duration", type=float, default=10.0, help="timed seconds per case")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--out", type=Path, help="write the markdown table here too")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    gflops = sgemm_gflops()
    print(f"single-thread sgemm: {gflops:.1f} GFLOP/s", file=sys.stderr)
    protocol = bench.Protocol(threads=1, batch=16, warmup_s=args.warmup, duration_s=args.duration)
    rows, raw = [], []
    for name in args.variants:
        model = load(name, init="random")
        reference = build_reference_set(model)
        cases = bench.build_cases(model, ["ort", "openvino"], protocol, reference=reference)
        print(f"{name}: {len(cases)} cases …", file=sys.stderr)
        results, interrupted = bench.run_cases(cases, reference, protocol)
        by = {r.label: r for r in results}
        ours = [r for r in results if "levit-deploy" in r.label and r.images_per_s and r.status == "ok"]
        best = max(ours, key=lambda r: r.images_per_s)
        eager = by["torch unfused (eager)"].images_per_s
        plain = by["ort plain export (unfused)"].images_per_s
        roofline = gflops * 1e9 / (2 * family_of(model).count_flops(model.config))
        rows.append((name, PAPER_INTEL.get(name), eager, plain, best.images_per_s, best.label.split()[0], roofline))
        raw.append(bench.report_document(results, protocol, interrupted, name))
        if interrupted:
            break
    lines = [
        f"One thread, batch 16, fp32, {fingerprint(1)['cpu']['model']}; sgemm roofline {gflops:.1f} GFLOP/s. "
        f"images/s = 16 / median call time.",
        "",
        "| variant | LeViT paper (Xeon 6138) | PyTorch eager, unfused | ORT plain unfused export | levit-deploy best | "
        "best / eager | best / ORT plain | roofline | best / roofline |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, paper, eager, plain, best, runtime, roof in rows:
        lines.append(f"| {name} | {'-' if paper is None else f'{paper:.1f}'} | {eager:.1f} | {plain:.1f} | {best:.1f} ({runtime}) | "
                     f"{best / eager:.2f}x | {best / plain:.2f}x | {roof:.0f} | {best / roof:.0%} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps({"sgemm_gflops": gflops, "runs": raw}, indent=2, default=str))


if __name__ == "__main__":
    main()
