"""Which tensor layout should DeployLevit use? Measured, not assumed (issue 3).

Builds three numerically equivalent deploy graphs from one fused LeViT and times them in ONNX
Runtime and OpenVINO, one thread, batch 16, interleaved:

- tokens: (B, N, C) activations, nn.Linear (MatMul+Add, which ORT folds into Gemm) — DeployLevit
- tokens2d: (B·N, C) activations so every linear is a plain 2-D Gemm, reshaped only for attention
- bchw: (B, C, H, W) activations with 1x1 convolutions (timm's levit_conv_* / official levit_c style);
  keys come out already transposed and attention·V is computed as V·Attnᵀ, so fewer transposes

Usage: python benchmarks/fused_layout.py [--variant levit_128s] [--seconds 20]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from levit_deploy.checkpoints import load
from levit_deploy.fuse import fuse
from levit_deploy.env import fingerprint
from levit_deploy.models.deploy import DeployAttention, DeployAttentionSubsample, DeployLevit, DeployMlp, Residual


def conv1x1(linear: nn.Linear) -> nn.Conv2d:
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1)
    conv.weight.data = linear.weight.data[:, :, None, None].clone()
    conv.bias.data = linear.bias.data.clone()
    return conv


class ConvAttention(nn.Module):
    def __init__(self, a: DeployAttention | DeployAttentionSubsample, resolution: int):
        super().__init__()
        self.h, self.d, self.v = a.num_heads, a.key_dim, a.val_dim
        self.sub = isinstance(a, DeployAttentionSubsample)
        self.stride = a.stride if self.sub else 1
        self.res_out = (resolution - 1) // self.stride + 1
        if self.sub:
            self.kv, self.q = conv1x1(a.kv), conv1x1(a.q)
        else:
            self.qkv = conv1x1(a.qkv)
        self.proj = conv1x1(a.proj)
        self.act = nn.Hardswish()
        self.register_buffer("bias", a.attention_bias.clone())

    def forward(self, x):
        hd = self.h * self.d
        if self.sub:
            kv = self.kv(x).flatten(2)
            k, v = kv[:, :hd], kv[:, hd:]
            q = self.q(x[:, :, ::self.stride, ::self.stride]).flatten(2)
        else:
            qkv = self.qkv(x).flatten(2)
            q, k, v = qkv[:, :hd], qkv[:, hd:2 * hd], qkv[:, 2 * hd:]
        q = q.unflatten(1, (self.h, self.d)).transpose(-2, -1)  # B h Nq d
        k = k.unflatten(1, (self.h, self.d))  # B h d Nk: already kᵀ
        v = v.unflatten(1, (self.h, self.v))  # B h v Nk
        attn = (q @ k + self.bias).softmax(-1)  # B h Nq Nk
        out = (v @ attn.transpose(-2, -1)).flatten(1, 2)  # B (h v) Nq
        return self.proj(self.act(out.unflatten(2, (self.res_out, self.res_out))))


class BchwLevit(nn.Module):
    def __init__(self, deploy: DeployLevit):
        super().__init__()
        self.stem = deploy.stem
        layers, res = [], 14
        for layer in deploy.stages:
            if isinstance(layer, DeployAttentionSubsample):
                layers.append(ConvAttention(layer, res))
                res = (res - 1) // 2 + 1
            elif isinstance(layer.inner, DeployAttention):
                layers.append(Residual(ConvAttention(layer.inner, res)))
            else:
                mlp = layer.inner
                layers.append(Residual(nn.Sequential(conv1x1(mlp.up), nn.Hardswish(), conv1x1(mlp.down))))
        self.stages = nn.Sequential(*layers)
        self.head = deploy.head.linear

    def forward(self, x):
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class Tokens2dLevit(nn.Module):
    """Activations kept as (B·N, C): linears are 2-D Gemms; attention reshapes to (B, h, N, d)."""

    def __init__(self, deploy: DeployLevit):
        super().__init__()
        self.deploy = deploy

    def forward(self, x):
        t = self.deploy.stem(x).flatten(2).transpose(1, 2)
        for layer in self.deploy.stages:
            inner = layer.inner if isinstance(layer, Residual) else layer
            if isinstance(inner, DeployMlp):
                b, n, c = t.shape
                flat = t.reshape(b * n, c)
                t = (flat + inner.down(inner.act(inner.up(flat)))).reshape(b, n, c)
            else:
                t = layer(t)
        return self.deploy.head(t)


def export(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 224, 224),), str(path), input_names=["pixel_values"],
                          output_names=["logits"], dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})


def sessions(path: Path):
    import onnxruntime as ort

    from levit_deploy.backends.openvino import shared_core

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    compiled = shared_core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
                                                         "INFERENCE_PRECISION_HINT": "f32",
                                                         "PERFORMANCE_HINT": "LATENCY"})
    req = compiled.create_infer_request()
    return {"ort": lambda x: sess.run(None, {"pixel_values": x})[0],
            "openvino": lambda x: req.infer({0: x})[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="levit_128s")
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per (layout, runtime)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)

    model = load(args.variant, init="random")
    deploy = fuse(model)
    layouts = {"tokens": deploy, "tokens2d": Tokens2dLevit(deploy).eval(), "bchw": BchwLevit(deploy).eval()}
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ref = deploy(torch.from_numpy(x)).numpy()
    runners, tmp = {}, Path(tempfile.mkdtemp())
    for name, module in layouts.items():
        export(module, tmp / f"{name}.onnx")
        for rt, fn in sessions(tmp / f"{name}.onnx").items():
            err = float(np.abs(fn(x) - ref).max())
            assert err < 1e-3 * np.abs(ref).max(), (name, rt, err)
            runners[(name, rt)] = fn
    times = {key: [] for key in runners}
    for fn in runners.values():  # warm-up
        for _ in range(3):
            fn(x)
    spent = {key: 0.0 for key in runners}
    while min(spent.values()) < args.seconds:
        for key, fn in runners.items():  # interleaved rounds
            for _ in range(2):
                t0 = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - t0)
                spent[key] += times[key][-1]
        print(f"\r{min(spent.values()):5.1f}/{args.seconds:g} s", end="", file=sys.stderr)
    print(file=sys.stderr)
    rows = []
    for (name, rt), ts in times.items():
        med = float(np.median(ts))
        rows.append({"layout": name, "runtime": rt, "images_per_s": args.batch / med, "p50_ms": med * 1e3,
                     "p90_ms": float(np.percentile(ts, 90)) * 1e3, "calls": len(ts)})
    print(f"{args.variant}, 1 thread, batch {args.batch}, {fingerprint(1)['cpu']['model']}")
    print(f"{'layout':10} {'runtime':9} {'img/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'calls':>6}")
    for r in sorted(rows, key=lambda r: (r["runtime"], -r["images_per_s"])):
        print(f"{r['layout']:10} {r['runtime']:9} {r['images_per_s']:7.1f} {r['p50_ms']:8.1f} {r['p90_ms']:8.1f} "
              f"{r['calls']:6d}")
    if args.json:
        args.json.write_text(json.dumps({"variant": args.variant, "batch": args.batch, "rows": rows,
                                         "machine": fingerprint(1)}, indent=2))


if __name__ == "__main__":
    main()
