"""Measure the parity rule on trained-like checkpoints: how far correct candidates sit from the floor,
and which injected errors the gate catches. The numbers behind K and the floor draws in parity.py.

    python benchmarks/parity_floor.py [--variants levit_128s levit_384] [--out benchmarks/results/parity_floor.md]

Checkpoints: the shared trained-like LeViT-128S (../shared/checkpoints, if present) and, per variant, one
built here with BatchNorm statistics calibrated on smooth images (tests/trained_like.py). Candidates:
the fused model in PyTorch, the ONNX artifact in ONNX Runtime, the OpenVINO IR; all fp32. For each we
report the largest e/floor over the default reference set, against a floor from one fp32 run and from
the five-draw ensemble that parity.py uses, then inject weight errors into the fused model.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from layouts_ref import hf_model, hf_state_dict  # noqa: E402
from trained_like import make_trained_like_  # noqa: E402

import levit_deploy as ld  # noqa: E402
from levit_deploy.checkpoints import build_from_state_dict  # noqa: E402
from levit_deploy.backends import get_backend  # noqa: E402
from levit_deploy.export import ExportOptions  # noqa: E402
from levit_deploy.fuse import fuse_checked  # noqa: E402
from levit_deploy.parity import FLOOR_FACTOR, compare_outputs, run_candidate  # noqa: E402
from levit_deploy.reference import build_reference_set

SHARED = ROOT.parent / "shared" / "checkpoints" / "levit_128s_trained_like.pth"
FACTORS = {"1 + 1e-6": 1 + 1e-6, "1.001": 1.001, "1.01": 1.01}


def checkpoints(variants):
    if SHARED.is_file():
        yield "shared levit_128s (smooth)", ld.load(SHARED)
    for v in variants:
        hf = hf_model(v, seed=3)
        make_trained_like_(hf, "smooth", seed=3)
        yield f"{v} (smooth, seed 3)", build_from_state_dict(hf_state_dict(hf), "hf")


def artifact_outputs(deploy, target: str, inputs: np.ndarray) -> np.ndarray:
    backend = get_backend(target)
    with tempfile.TemporaryDirectory() as tmp:
        staged = backend.write(deploy, Path(tmp), ExportOptions(target=backend.parse_options({})))
        with backend.runtime_class(str(Path(tmp) / staged.file)) as rt:
            return run_candidate(rt, inputs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="*", default=["levit_128s", "levit_128", "levit_192", "levit_256",
                                                       "levit_384"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "parity_floor.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows, bug_rows = [], []
    for label, model in checkpoints(args.variants):
        t0 = time.perf_counter()
        ref = build_reference_set(model)
        floors = ref.floors("fp32")
        single = np.abs(floors[0] - ref.outputs).max(1)
        ensemble = np.abs(floors - ref.outputs[None]).max(2).max(0)
        s = np.abs(ref.outputs).max(1)
        deploy = fuse_checked(model, ref).model
        outs = {"fused (torch)": run_candidate(deploy, ref.inputs),
                "onnx (ort)": artifact_outputs(deploy, "onnx", ref.inputs),
                "openvino": artifact_outputs(deploy, "openvino", ref.inputs)}
        small = int((FLOOR_FACTOR * ensemble <= 1e-4 * s).sum())
        for cand, out in outs.items():
            e = np.abs(out - ref.outputs).max(1)
            report = compare_outputs(ref.outputs, out, "fp32", cand, floors, ref.kinds, ref.names)
            rows.append((label, cand, f"{(e / single).max():.2f}", f"{(e / ensemble).max():.2f}",
                         f"{report.worst_margin:.2f}", "PASS" if report.passed else "FAIL", f"{small}/{len(ref)}"))
        for factor_label, factor in FACTORS.items():
            qkv = [n for n, _ in deploy.named_parameters() if n.endswith("qkv.weight")]
            for name in ("stem.0.weight", qkv[len(qkv) // 2], "head.linear.weight"):
                bad = copy.deepcopy(deploy)
                with torch.no_grad():
                    dict(bad.named_parameters())[name].mul_(factor)
                report = compare_outputs(ref.outputs, run_candidate(bad, ref.inputs), "fp32", name, floors,
                                         ref.kinds, ref.names)
                caught = sum(not r["passed"] for r in report.per_input)
                bug_rows.append((label, name, f"× ({factor_label})", f"{caught}/{len(ref)}",
                                 "caught" if not report.passed else "passes"))
        print(f"{label}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    lines = ["# Parity rule on trained-like checkpoints", "",
             f"`python benchmarks/parity_floor.py`; reference set: 7 bundled photos + 4 noise + 4 synthetic JPEGs; "
             f"K = {FLOOR_FACTOR}.", "",
             "## Correct fp32 candidates: largest e/floor", "",
             "| checkpoint | candidate | max e / single-run floor | max e / 5-draw floor | worst e/bound | gate | "
             "inputs with a small floor |", "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Injected errors in the fused model (one weight tensor scaled)", "",
              "| checkpoint | tensor | factor | inputs failing | gate |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in bug_rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
