"""Why per-tensor int8 activations hurt a checkpoint: for every Linear of the deployed (fused) model, how far its
input's largest value stands above the bulk (max|x| / 99.9th percentile of |x|, over the calibration images), and
the share of the input's values that a per-tensor uint8 MinMax grid rounds to its zero step.

    .venv/bin/python benchmarks/activation_outliers.py CKPT CALIB_DIR [--images 16]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import levit_deploy as ld
from levit_deploy.calibration import calibration_set
from levit_deploy.families import spec_for_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("calib")
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = ld.load(args.checkpoint)
    deploy = ld.fuse(model)
    x = torch.from_numpy(calibration_set(spec_for_model(model), args.calib, limit=args.images).inputs)
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, name=name: seen.setdefault(name, []).append(a[0].detach()))
             for name, m in deploy.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i in range(len(x)):
            deploy(x[i:i + 1])
    for h in hooks:
        h.remove()
    rows = []
    for name, values in seen.items():
        a = torch.cat([v.flatten() for v in values]).double()
        top, bulk = float(a.abs().max()), float(torch.quantile(a.abs()[::max(1, a.numel() // 2_000_000)], 0.999))
        step = (float(a.max()) - min(float(a.min()), 0.0)) / 255  # uint8 MinMax, zero point included
        rows.append((name, top / max(bulk, 1e-12), float((a.abs() < step / 2).double().mean())))
    ratios = np.array([r[1] for r in rows])
    zeroed = np.array([r[2] for r in rows])
    worst = sorted(rows, key=lambda r: -r[1])[:5]
    print(f"{model.config.name}: {len(rows)} linears; max|x| / p99.9|x|: median {np.median(ratios):.1f}, "
          f"max {ratios.max():.1f}; values rounded to the zero step: median {np.median(zeroed):.1%}, "
          f"max {zeroed.max():.1%}")
    print("  largest ratios: " + ", ".join(f"{n} {r:.1f} ({z:.0%} zeroed)" for n, r, z in worst))


if __name__ == "__main__":
    main()
