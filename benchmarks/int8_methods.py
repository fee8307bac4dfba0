"""Which calibration method each int8 backend should default to: measured on an in-distribution checkpoint.

Every layer the backend quantizes is quantized (no layers kept in float: this compares the methods, not the
remedy), except in the last row: NNCF's own accuracy-controlled remedy, for comparison with ours; each variant is calibrated on CALIB and judged on IMAGES (other crops) against the same fp32 model in the
same runtime, by the per-image cosine and top-1 agreement.

    python benchmarks/int8_methods.py ../shared/checkpoints/in_distribution/levit_128s_in_distribution.pth \
        --calib ../shared/checkpoints/in_distribution/calib --images ../shared/checkpoints/in_distribution/images

Writes benchmarks/results/int8_methods.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import levit_deploy as ld
from levit_deploy.backends.onnx import INT8_OPS, layer_paths, write_onnx
from levit_deploy.families import spec_for_model
from levit_deploy.fuse import fuse
from levit_deploy.preprocess import decode_image, expand_inputs, transform


def images(folder: Path, spec) -> np.ndarray:
    return np.stack([transform(decode_image(p), spec) for p in expand_inputs([folder])])


def cosines(ref: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    cos = (ref * out).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(out, axis=1)
    return float(cos.min()), float(np.median(cos)), float(np.mean(ref.argmax(1) == out.argmax(1)))


def ort_methods(fp32: Path, calib: np.ndarray, judge: np.ndarray) -> list[tuple[str, tuple, float]]:
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calib)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"pixel_values": np.ascontiguousarray(x[None])}

    def run(path):
        with ld.open_runtime(path, threads=1) as rt:
            return np.concatenate([rt.infer(judge[i:i + 8]) for i in range(0, len(judge), 8)])

    ref = run(fp32)
    prepared = fp32.with_name("prepared.onnx")
    with contextlib.redirect_stdout(io.StringIO()):
        quant_pre_process(str(fp32), str(prepared))
    nodes = list(layer_paths(onnx.load(str(prepared)).graph, INT8_OPS))
    rows = []
    for name, method, extra in [("MinMax (default)", CalibrationMethod.MinMax, {}),
                                ("Percentile 99.999", CalibrationMethod.Percentile, {"percentile": 99.999}),
                                ("Entropy", CalibrationMethod.Entropy, {})]:
        out = fp32.with_name(f"q-{method.name}.onnx")
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                            op_types_to_quantize=list(INT8_OPS), calibrate_method=method,
                            extra_options={"CalibPercentile": extra["percentile"]} if extra else {})
        rows.append((f"ONNX Runtime QDQ, {name}", cosines(ref, run(out)), time.perf_counter() - start))
    return rows


def nncf_methods(fp32: Path, calib: np.ndarray, judge: np.ndarray) -> list[tuple[str, tuple, float]]:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    logging.getLogger("nncf").setLevel(logging.ERROR)
    core = ov.Core()
    ir = ov.convert_model(str(fp32))

    def run(model):
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 1})
        return np.concatenate([compiled(judge[i:i + 1])[0] for i in range(len(judge))])

    ref = run(ir)
    data = nncf.Dataset(list(calib), lambda x: x[None])
    no_sq = AdvancedSmoothQuantParameters(matmul=-1)
    minmax = RangeEstimatorParametersSet.MINMAX
    variants = {
        "NNCF transformer, SmoothQuant off, default ranges": dict(
            model_type=nncf.ModelType.TRANSFORMER, advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=no_sq)),
        "NNCF transformer, SmoothQuant off, MinMax ranges (ours)": dict(
            model_type=nncf.ModelType.TRANSFORMER, advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=no_sq, activations_range_estimator_params=minmax)),
        "NNCF transformer, SmoothQuant on (NNCF's default)": dict(model_type=nncf.ModelType.TRANSFORMER),
        "NNCF default model type, SmoothQuant off": dict(advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=no_sq)),
        "NNCF transformer, MinMax, attention (SDPA) inputs ignored": dict(
            model_type=nncf.ModelType.TRANSFORMER, ignored_scope=nncf.IgnoredScope(types=["ScaledDotProductAttention"]),
            advanced_parameters=AdvancedQuantizationParameters(smooth_quant_alphas=no_sq,
                                                               activations_range_estimator_params=minmax)),
    }
    rows = []
    for name, kwargs in variants.items():
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantized = nncf.quantize(ir, data, subset_size=len(calib), **kwargs)
        rows.append((name, cosines(ref, run(quantized)), time.perf_counter() - start))
    plain = variants["NNCF transformer, SmoothQuant off, MinMax ranges (ours)"]
    rows.append(accuracy_controlled(ir, data, judge, ref, run, plain, len(calib)))
    return rows


def accuracy_controlled(ir, data, judge: np.ndarray, ref: np.ndarray, run, kwargs: dict, subset: int):
    """NNCF's own remedy, `quantize_with_accuracy_control` (OpenVINO only): from our NNCF settings, it reverts the
    quantizers that cost the most until the metric -- here the mean cosine to the fp32 IR on the judging images --
    drops by at most 0.01. Returns the row, its name saying how many FakeQuantize operations it reverted."""
    import nncf

    def mean_cosine_to_fp32(compiled, items):
        per = []
        for x, i in items:
            out = compiled(x[None])[0][0]
            per.append(float(out @ ref[i] / (np.linalg.norm(out) * np.linalg.norm(ref[i]))))
        return float(np.mean(per)), per

    def fake_quantizes(model) -> int:
        return sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        quantized = nncf.quantize_with_accuracy_control(
            ir, data, nncf.Dataset([(x, i) for i, x in enumerate(judge)]), mean_cosine_to_fp32, max_drop=0.01,
            subset_size=subset, model_type=kwargs["model_type"],
            advanced_quantization_parameters=kwargs["advanced_parameters"])
        every = fake_quantizes(nncf.quantize(ir, data, subset_size=subset, **kwargs))
    reverted = every - fake_quantizes(quantized)
    name = (f"NNCF quantize_with_accuracy_control from ours (mean cosine drop <= 0.01 on the judging images; "
            f"{reverted} of {every} FakeQuantize reverted)")
    return name, cosines(ref, run(quantized)), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_methods.md")
    args = parser.parse_args()
    model = ld.load(args.checkpoint)
    spec = spec_for_model(model)
    calib, judge = images(args.calib, spec), images(args.images, spec)
    with tempfile.TemporaryDirectory() as tmp:
        staged = write_onnx(fuse(model), Path(tmp), "fp32")
        rows = ort_methods(Path(tmp) / staged.file, calib, judge) + nncf_methods(Path(tmp) / staged.file, calib, judge)
    lines = [f"# int8 calibration methods on {Path(args.checkpoint).name}", "",
             f"Every quantizable layer in int8 (no layers kept in float); calibrated on {len(calib)} images "
             f"({args.calib}), judged on {len(judge)} other images ({args.images}) against the fp32 model in the same "
             f"runtime. Machine: {platform.processor() or platform.machine()}, {datetime.date.today()}.", "",
             f"`python benchmarks/int8_methods.py {args.checkpoint} --calib {args.calib} --images {args.images}`", "",
             "| method | worst cosine | median cosine | top-1 agreement | quantize s |", "|---|--:|--:|--:|--:|"]
    for name, (worst, median, top1), seconds in rows:
        lines.append(f"| {name} | {worst:.4f} | {median:.4f} | {top1:.0%} | {seconds:.0f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
