"""Deformable convolution candidates for LITv2's DTM, side by side: speed and exactness, per runtime.

    python benchmarks/deform_conv.py [--rounds 15] [--batch 16] [--out benchmarks/results/deform_conv.md]

Candidates (levit_deploy/families/litv2/deform.py): ``gather`` (GatherElements of the four neighbours),
``grid_sample`` (GridSample, align_corners=True) and ``deformconv`` (ONNX DeformConv, opset 19), each exported
with torch.onnx and run in ONNX Runtime and OpenVINO (whose ONNX reader has no DeformConv: the openvino
backend maps it onto OpenVINO's DeformableConvolution, which is also timed per layer built directly with
the OpenVINO opset API). One CPU thread, rounds
interleaved, medians. Exactness: max |error| / max |reference| against the float64 tent-weight reference
of tests/litv2_ref.py, on trained-like-sized offsets (1-2 px, some samples outside the image).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from litv2_ref import deform_conv_tent  # noqa: E402

from levit_deploy.families import get_family  # noqa: E402
from levit_deploy.families.litv2.deform import METHODS, onnx_translations  # noqa: E402
from levit_deploy.families.litv2.model import DeformConv2dPack  # noqa: E402

torch.set_num_threads(1)


def export(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    opaque = any(getattr(m, "method", None) == "deformconv" for m in module.modules())
    translations = onnx_translations() if opaque else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=19, verbose=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                          custom_translation_table=translations or None)
    return path


def ort_runner(path: Path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def ov_runner(model_or_path):
    import openvino as ov

    from levit_deploy.backends.openvino import onnx_extensions
    if isinstance(model_or_path, str):  # an ONNX file, read as the openvino backend reads it
        model_or_path = ov.convert_model(model_or_path, extension=onnx_extensions())
    core = ov.Core()
    compiled = core.compile_model(model_or_path, "CPU", {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1,
                                                         "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    return lambda x: request.infer([x])[compiled.output(0)].copy()


def ov_native_layer(layer: DeformConv2dPack, batch_shape):
    """The same layer as OpenVINO's own DeformableConvolution (opset 8)."""
    import openvino as ov
    import openvino.opset8 as ops
    x = ops.parameter(batch_shape, np.float32, name="x")
    off_w = layer.conv_offset.weight.detach().numpy()
    offset = ops.add(ops.convolution(x, ops.constant(off_w), [2, 2], [0, 0], [0, 0], [1, 1]),
                     ops.constant(layer.conv_offset.bias.detach().numpy().reshape(1, -1, 1, 1)))
    y = ops.deformable_convolution(x, offset, ops.constant(layer.weight.detach().numpy()), [2, 2], [0, 0], [0, 0],
                                   [1, 1], bilinear_interpolation_pad=True)  # False zeroes border samples
    y = ops.add(y, ops.constant(layer.bias.detach().numpy().reshape(1, -1, 1, 1)))
    return ov.Model([y], [x], "dtm")


def time_rounds(runners: dict, x: np.ndarray, rounds: int) -> dict[str, float]:
    for run in runners.values():
        run(x)
    times = {k: [] for k in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(x)
            times[name].append(time.perf_counter() - start)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def layer_table(dim: int, side: int, batch: int, rounds: int, work: Path) -> list[dict]:
    torch.manual_seed(0)
    layer = DeformConv2dPack(dim, 2 * dim, 2, 2, 0, side).eval()
    with torch.no_grad():  # offsets of 1-2 px from unit-scale tokens, as in a trained DTM
        layer.conv_offset.weight.normal_(0, (4 * dim) ** -0.5)
        layer.conv_offset.bias.normal_(0, 0.5)
    x = torch.randn(batch, dim, side, side)
    with torch.no_grad():
        offset = layer.conv_offset(x.double().float()).double()
        reference = deform_conv_tent(x.double(), offset, layer.weight.double(), layer.bias.double(), 2, 0).numpy()
    scale = float(np.abs(reference).max())
    runners, rows = {}, []
    for method in METHODS:
        layer.method = method
        if method != "deformconv":
            runners[f"torch eager|{method}"] = lambda a, m=method: layer(torch.from_numpy(a)).detach().numpy()
        path = export(layer, x[:2], work / f"layer-{dim}-{method}.onnx")
        runners[f"ort|{method}"] = ort_runner(path)
        runners[f"openvino|{method}"] = ov_runner(str(path))
    runners["openvino|DeformableConvolution built directly"] = ov_runner(ov_native_layer(layer, [-1, dim, side, side]))
    xs = x.numpy()
    timings = time_rounds(runners, xs, rounds)
    for key, run in runners.items():
        runtime, candidate = key.split("|")
        err = float(np.abs(run(xs).astype(np.float64) - reference).max()) / scale
        rows.append({"runtime": runtime, "candidate": candidate, "ms": timings[key], "error": f"{err:.1e}"})
    return rows


def model_table(variant: str, batch: int, rounds: int, work: Path) -> list[dict]:
    family = get_family("litv2")
    model = family.randomize_(family.create(family.config(variant)), 0)
    for step_name, step in family.fusion_steps():
        step(model)
    x = torch.randn(batch, 3, 224, 224)
    runners = {}
    with torch.no_grad():
        reference = model.double()(x.double()).numpy()
    model.float()
    scale = float(np.abs(reference).max())
    for method in METHODS:
        model.set_deform_method(method)
        path = export(model, x[:2], work / f"{variant}-{method}.onnx")
        runners[f"ort|{method}"] = ort_runner(path)
        runners[f"openvino|{method}"] = ov_runner(str(path))
    xs = x.numpy()
    timings = time_rounds(runners, xs, rounds)
    rows = []
    for key, run in runners.items():
        runtime, candidate = key.split("|")
        err = float(np.abs(run(xs).astype(np.float64) - reference).max()) / scale
        rows.append({"runtime": runtime, "candidate": candidate, "ms": timings[key], "error": f"{err:.1e}"})
    return rows


def markdown(title: str, rows: list[dict]) -> str:
    lines = [f"### {title}", "", "| runtime | candidate | median ms | max err / max ref |", "|---|---|---|---|"]
    for r in rows:
        ms = f"{r['ms']:.2f}" if r["ms"] is not None else "–"
        lines.append(f"| {r['runtime']} | {r['candidate']} | {ms} | {r['error']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--variant", default="litv2_s")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    import onnxruntime
    import openvino
    parts = [f"# Deformable convolution candidates (LITv2 DTM)\n\n`python benchmarks/deform_conv.py --rounds "
             f"{args.rounds} --batch {args.batch}`: batch {args.batch}, 1 thread, {args.rounds} interleaved rounds, "
             f"medians; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino "
             f"{openvino.__version__}.\n"]
    for dim, side in ((96, 56), (384, 14)):
        rows = layer_table(dim, side, args.batch, args.rounds, work)
        parts.append(markdown(f"One DTM layer: {dim} -> {2 * dim} channels, {side}x{side} -> {side // 2}x{side // 2}",
                              rows))
        print(parts[-1], flush=True)
    rows = model_table(args.variant, args.batch, max(3, args.rounds // 3), work)
    parts.append(markdown(f"Whole {args.variant} (fused, random trained-like-scale weights)", rows))
    print(parts[-1], flush=True)
    if args.out:
        args.out.write_text("\n".join(parts))


if __name__ == "__main__":
    main()
