"""Is PyTorch's AOTInductor a candidate beside OpenVINO? (issue: optimize, part 3)

AOTInductor compiles an exported program ahead of time into a `.pt2` package (a shared library plus weights)
that C++ or Python loads without the model's code. This script builds one for the deployed (fused) LeViT-128S in
fp32, and one in int8 with PT2E and the x86 Inductor quantizer (static, per-channel weights, calibrated on the
in-distribution `calib/`), judges both against the fp64 reference set like every artifact (fp32 rule, int8 rule),
and times them side by side with given artifact folders (our OpenVINO fp32 and int8) in one interleaved bench run.

    .venv/bin/python benchmarks/aoti.py CKPT --calib CALIB --images IMAGES --artifact OV_FP32 --artifact OV_INT8

The verdict goes into the closing note; a backend is added only where AOTInductor beats OpenVINO.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from levit_deploy import load
from levit_deploy.backends import open_runtime
from levit_deploy.backends.base import in_chunks
from levit_deploy.bench import BenchCase, Protocol, format_table, run_cases
from levit_deploy.calibration import calibration_set
from levit_deploy.families import spec_for_model
from levit_deploy.fuse import fuse
from levit_deploy.parity import compare
from levit_deploy.reference import build_reference_set


INT8_BATCH = 16


class AotiRuntime:
    """The bench/parity runtime interface over a loaded `.pt2` package."""

    def __init__(self, path: Path, precision: str, batch: int | None = None):
        self.path, self.precision, self.batch, self.output_transform = path, precision, batch, None
        self.runner = torch._inductor.aoti_load_package(str(path))

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self._run(x) if self.batch is None else in_chunks(self._run, x, self.batch, pad=True)

    def _run(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.runner(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        return (out[0] if isinstance(out, (list, tuple)) else out).numpy()

    def info(self) -> dict:
        return {"path": str(self.path), "threads": torch.get_num_threads()}

    def close(self) -> None:
        pass


def exported(module: torch.nn.Module, size: int, batch: int | None = None) -> torch.export.ExportedProgram:
    """A dynamic batch, or a fixed one."""
    if batch is not None:
        return torch.export.export(module, (torch.randn(batch, 3, size, size),))
    dim = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(module, (torch.randn(2, 3, size, size),), dynamic_shapes=({0: dim},))


def compile_fp32(deploy: torch.nn.Module, size: int, out: Path) -> Path:
    torch._inductor.config.freezing = True
    with torch.no_grad():
        return Path(torch._inductor.aoti_compile_and_package(exported(deploy, size), package_path=str(out)))


def compile_int8(deploy: torch.nn.Module, size: int, calib: np.ndarray, out: Path) -> Path:
    """At a fixed batch of 16: with a dynamic batch, Inductor's int8 freezing pass fails in torch 2.13
    (fx_passes/quantization.py: ``torch.Size() takes an iterable of 'int' (item 0 is 'Node')``)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (X86InductorQuantizer,
                                                                               get_default_x86_inductor_quantization_config)
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported(deploy, size, INT8_BATCH).module(), quantizer)
    with torch.no_grad():
        for i in range(0, len(calib) - INT8_BATCH + 1, INT8_BATCH):
            prepared(torch.from_numpy(calib[i:i + INT8_BATCH]))
    converted = convert_pt2e(prepared)
    torch._inductor.config.freezing = True
    with torch.no_grad():
        return Path(torch._inductor.aoti_compile_and_package(exported(converted, size, INT8_BATCH),
                                                             package_path=str(out)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--artifact", action="append", default=[], help="artifact folders to time beside (OpenVINO)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="aoti-")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    model = load(args.checkpoint)
    deploy, size = fuse(model, check=False).eval(), model.config.img_size
    reference = build_reference_set(model, spec_for_model(model), images=[args.images])
    calib = calibration_set(spec_for_model(model), args.calib).inputs
    timings, runtimes = {}, {}
    for precision, build in (("fp32", lambda p: compile_fp32(deploy, size, p)),
                             ("int8", lambda p: compile_int8(deploy, size, calib, p))):
        started = time.perf_counter()
        path = build(args.out / f"levit_128s-{precision}.pt2")
        timings[precision] = time.perf_counter() - started
        runtimes[precision] = AotiRuntime(path, precision, INT8_BATCH if precision == "int8" else None)
        report = compare(reference, runtimes[precision], precision, stage=f"aoti {precision}")
        print(f"aoti {precision}: compiled in {timings[precision]:.0f} s, {path.stat().st_size / 1e6:.1f} MB; "
              f"{report.summary()}", flush=True)
    cases = [BenchCase(f"aoti {p}", lambda p=p: runtimes[p], "aoti", p) for p in runtimes]
    cases += [BenchCase(f"artifact {Path(a).name}", lambda a=a: open_runtime(a, None, "cpu", 1), "artifact")
              for a in args.artifact]
    protocol = Protocol(threads=1, batch=16, warmup_s=2.0, duration_s=args.duration, cold_start=False,
                        img_size=size)
    results, _ = run_cases(cases, None, protocol)
    print(format_table(results))
    (args.out / "aoti.json").write_text(json.dumps([r.to_dict() for r in results], indent=2, default=str))


if __name__ == "__main__":
    main()
