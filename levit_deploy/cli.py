"""The ``levit-deploy`` command: argument handling and printing only; the work is in the library."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Load, fuse, export, verify, benchmark and run LeViT image classifiers.")

EXIT_FAILED = 1  # the work ran but its result failed a gate (parity, some images)
EXIT_ERROR = 2  # bad input or environment: nothing useful was produced


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .arm64 import Arm64Error
    from .checkpoints import CheckpointError
    from .exporters import ExportError
    from .manifest import ManifestError
    from .preprocess import ImageError
    from .runtimes.base import MissingDependency, RuntimeUnavailable

    return (Arm64Error, CheckpointError, ExportError, ManifestError, MissingDependency, RuntimeUnavailable, ImageError,
            ValueError, OSError, KeyError)


def fail(message: str, as_json: bool, code: int = EXIT_ERROR) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def status(message: str) -> None:
    """Progress goes to stderr so that --json output on stdout stays machine-readable."""
    print(message, file=sys.stderr, flush=True)


def run_guarded(as_json: bool, fn, *args, **kwargs):
    """Call into the library; a failed gate becomes one line and exit 1, known errors one line and exit 2."""
    from .exporters import ExportParityError
    from .fuse import FusionError

    try:
        return fn(*args, **kwargs)
    except (FusionError, ExportParityError) as e:
        fail(str(e), as_json, EXIT_FAILED)
    except _expected_errors() as e:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        fail(text, as_json)


def quiet_exporters() -> None:
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _load(model: str, weights: Optional[Path], init: str, num_classes: Optional[int] = None):
    from .checkpoints import load

    return load(model, weights=weights, num_classes=num_classes, init=init)


MODEL_HELP = "A variant name (levit_128s, levit_128, levit_192, levit_256, levit_384) or a checkpoint file/folder."
WEIGHTS_HELP = "Checkpoint for a variant name: official .pth, timm or Hugging Face (file or folder)."
INIT_HELP = ("For a variant name without --weights: 'pretrained' downloads the official release "
             "(cached, sha256-checked); 'random' uses seeded random weights (offline demos and tests).")
JSON_HELP = "Print one JSON document on stdout instead of a table."
IMAGES_HELP = ("A folder of your own images, added to the parity inputs as their own kind (the bundled "
               "photos, noise and synthetic JPEGs are always used).")


@app.command()
def info(path: str = typer.Argument(..., help=MODEL_HELP),
         weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
         init: str = typer.Option("pretrained", help=INIT_HELP),
         as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Show what a checkpoint is: layout, mode, variant, classes, parameters and FLOPs."""
    from .models import count_flops, count_parameters

    model = run_guarded(as_json, _load, path, weights, init)
    result = {**model.load_info.to_dict(), "params": count_parameters(model),
              "flops": count_flops(model.config), "config": model.config.to_dict()}
    if as_json:
        print(json.dumps({"ok": True, **result}, indent=2))
        return
    li = model.load_info
    print(f"source      {li.source}")
    print(f"layout      {li.layout}{' (fused)' if li.fused else ''}, {li.mode} mode, {li.file_format or '-'}")
    print(f"variant     {li.variant}, {li.num_classes} classes, {'distilled (2 heads)' if li.distilled else '1 head'}")
    print(f"parameters  {result['params']:,}")
    print(f"FLOPs       {result['flops'] / 1e6:.0f} M multiply-adds per image")
    if li.sha256:
        print(f"sha256      {li.sha256}")
    for note in li.notes:
        print(f"note        {note}")


@app.command()
def export(model: str = typer.Argument(..., help=MODEL_HELP),
           to: str = typer.Option(..., "--to", help="Target: onnx, openvino, coreml or tensorrt."),
           weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
           init: str = typer.Option("pretrained", help=INIT_HELP),
           out: Optional[Path] = typer.Option(None, help="Output folder [default: ./<variant>-<target>-<precision>]."),
           precision: str = typer.Option("fp32", help="fp32 or fp16 (bf16 for tensorrt)."),
           batch: str = typer.Option("dynamic", help="'dynamic' or a fixed batch size."),
           opset: int = typer.Option(18, help="ONNX opset (18+ uses the torch.export exporter; 13-17 the TorchScript one)."),
           simplify: bool = typer.Option(True, help="Simplify the ONNX graph with onnxsim when installed."),
           img_size: int = typer.Option(224, help="Input size. LeViT runs at 224 only; others are refused."),
           image_input: bool = typer.Option(False, help="CoreML: take an image input with normalisation folded in."),
           labels: bool = typer.Option(False, help="CoreML: embed ImageNet class labels (ClassifierConfig)."),
           min_target: str = typer.Option("macOS13", help="CoreML minimum deployment target (macOS13, iOS16, ...)."),
           max_batch: int = typer.Option(256, help="TensorRT: largest batch of the optimisation profile."),
           opt_batch: int = typer.Option(64, help="TensorRT: batch the engine is tuned for."),
           images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Fuse a model, export it, and keep the artifact only if it passes the parity gate."""
    from .exporters import export as do_export

    quiet_exporters()
    status(f"loading {model} …")
    ref = run_guarded(as_json, _load, model, weights, init)
    out = out or Path(f"{ref.config.name}-{to}-{precision}")
    extra = {}
    if to == "coreml":
        extra = {"image_input": image_input, "labels": labels, "min_target": min_target}
    elif to == "tensorrt":
        extra = {"max_batch": max_batch, "opt_batch": opt_batch}
    status(f"fusing, exporting to {to} ({precision}), checking parity …")
    from .exporters import ExportParityError
    from .fuse import FusionError
    try:
        artifact = do_export(ref, to, out, precision=precision, batch=batch, opset=opset, simplify=simplify,
                             img_size=img_size, images=[images] if images else (), **extra)
    except (ExportParityError, FusionError) as e:
        if as_json:
            print(json.dumps({"ok": False, "error": str(e), "parity": e.report.to_dict()}))
        else:
            print(format_kinds(e.report), file=sys.stderr)
        fail(str(e), as_json=False, code=EXIT_FAILED)
    except _expected_errors() as e:
        fail(str(e), as_json)
    m = artifact.manifest
    if as_json:
        print(json.dumps({"ok": True, "artifact": str(artifact.path), "manifest": m}, indent=2, default=str))
        return
    print(f"artifact    {artifact.path}  ({m['artifact']['size_bytes'] / 1e6:.1f} MB)")
    print(f"manifest    {artifact.folder / 'manifest.json'}")
    for step in m["fusion"]:
        print(f"fusion      {step['step']}: worst e/bound {step['worst_margin']:.2g}, max e/s "
              f"{step['max_e_over_s']:.1e} ok")
    p = m["parity"]
    if p["status"] == "pending":
        print(f"parity      pending: {p['reason']}")
    else:
        from .parity import ParityReport
        report = ParityReport.from_dict(p)
        print(f"parity      {p['status'].upper()} [{p['precision']}] on {p['inputs']}: worst e/bound "
              f"{report.worst_margin:.2g} (<= 1 passes), max e/s {report.max_e_over_s:.1e}, cosine ≥ "
              f"{report.min_cosine:.6f}, top-1 {report.top1_agreement:.0%}")
        print(format_kinds(report, indent="            "))
    for note in m["export"]["notes"] + m["parity"].get("notes", []):
        print(f"note        {note}")


@app.command()
def parity(model: str = typer.Argument(..., help=MODEL_HELP + " Or an artifact folder: its source is reloaded."),
           weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
           init: str = typer.Option("pretrained", help=INIT_HELP),
           artifact: List[Path] = typer.Option([], help="Artifact file or folder to add to the chain (repeatable)."),
           images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
           noise: int = typer.Option(4, help="Seeded N(0,1) tensors among the inputs (an input kind of its own)."),
           synthetic: int = typer.Option(4, help="Procedural JPEGs among the inputs (an input kind of its own)."),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Check the chain reference fp64 -> reference fp32 -> each fusion step -> each artifact.

    Every stage is judged input by input: its error e must stay within max(tol·s, 4·floor), where the
    floor is the original model's own error in that precision on that input (see README, Parity).
    """
    from .parity_chain import run_chain

    reports = run_guarded(as_json, run_chain, model, weights=weights, init=init, artifacts=artifact,
                          images=images, noise=noise, synthetic=synthetic)
    ok = all(r.passed for r in reports)
    if as_json:
        print(json.dumps({"ok": ok, "chain": [r.to_dict() for r in reports]}, indent=2))
    else:
        print(format_parity_table(reports))
        for r in reports[-1:] if len(reports) > 1 else reports:
            print(f"\n{r.stage} [{r.precision}], per input kind:")
            print(format_kinds(r))
            for note in r.notes:
                print(f"note: {note}")
    if not ok:
        raise typer.Exit(EXIT_FAILED)


def _table(rows: list[tuple], indent: str = "") -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [indent + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, indent + "-" * (len(lines[0]) - len(indent)))
    return "\n".join(lines)


def format_parity_table(reports) -> str:
    """One row per stage: the worst input's e/bound (<= 1 passes) and what bounded it."""
    rows = [("stage", "prec", "worst e/bound", "max e/s", "bound: tol/floor", "cos min", "top-1", "result")]
    for r in reports:
        tol = sum(k.decided_by_tolerance for k in r.kinds if k.gating)
        floor = sum(k.decided_by_floor for k in r.kinds if k.gating)
        rows.append((r.stage, r.precision, f"{r.worst_margin:.2g}", f"{r.max_e_over_s:.1e}", f"{tol}/{floor}",
                     f"{r.min_cosine:.6f}", f"{r.top1_agreement:.0%}",
                     "PASS" if r.passed else "FAIL " + "; ".join(r.failures[:2])))
    text = _table(rows)
    if reports:
        text += f"\ninputs: {reports[0].inputs}"
    return text


def format_kinds(report, indent: str = "") -> str:
    """Per input kind: the largest s, e/s and floor/s, which bound decided, the worst e/bound, the verdict."""
    rows = [("kind", "n", "max s", "max e/s", "max floor/s", "bound: tol/floor", "worst e/bound", "result")]
    for k in report.kinds:
        verdict = "not judged" if not k.gating else "PASS" if not k.failed else f"FAIL ({k.failed})"
        rows.append((k.kind, k.n, f"{k.max_s:.3g}", f"{k.max_e_over_s:.1e}", f"{k.max_floor_over_s:.1e}",
                     f"{k.decided_by_tolerance}/{k.decided_by_floor}", f"{k.worst_margin:.2g}", verdict))
    return _table(rows, indent)


def installed_runtimes() -> list[str]:
    import importlib.util

    found = ["torch"]
    for name, module in (("ort", "onnxruntime"), ("openvino", "openvino"), ("tensorrt", "tensorrt")):
        if importlib.util.find_spec(module) is not None:
            found.append(name)
    return found


@app.command()
def bench(targets: List[str] = typer.Argument(None, help="Variant names, checkpoints or artifact folders "
                                                    "[default: levit_128s]."),
          runtime: List[str] = typer.Option([], "--runtime", "-r",
                                            help="torch, ort, openvino, tensorrt (repeatable) [default: all installed]."),
          weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
          init: str = typer.Option("pretrained", help=INIT_HELP),
          threads: int = typer.Option(1, help="Threads per runtime (the paper: 1 on CPU)."),
          batch: int = typer.Option(16, help="Batch size (the paper: 16 on CPU)."),
          sweep_batches: bool = typer.Option(False, "--sweep", help="Also measure throughput over batch 1..--max-batch."),
          max_batch: int = typer.Option(64, help="Largest batch of --sweep (powers of two)."),
          device: str = typer.Option("cpu", help="cpu or cuda (cuda: largest power-of-two batch that fits)."),
          precision: Optional[str] = typer.Option(None, help="fp32, fp16 or bf16 for torch (autocast), tensorrt "
                                                             "and openvino (inference precision; bf16 uses AMX / "
                                                             "AVX-512 bf16 where present) [default: fp32 on cpu, "
                                                             "fp16 on cuda as the paper]; parity follows it."),
          duration: float = typer.Option(10.0, help="Timed seconds per case (rounds are interleaved)."),
          warmup: float = typer.Option(2.0, help="Warm-up seconds before timing."),
          arch: Optional[str] = typer.Option(None, help="arm64: Graviton presets natively, or emulated parity on x86-64."),
          fast_math: bool = typer.Option(False, "--bf16-fast-math", help="arm64: opt into bf16 fast-math GEMM "
                                                                             "(parity then uses the bf16 tolerance)."),
          plot: Optional[Path] = typer.Option(None, help="Write the --sweep curve to this PNG (needs matplotlib)."),
          images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Time LeViT side by side with the paper's protocol (1 thread, batch 16 on CPU)."""
    from . import bench as b

    quiet_exporters()
    if arch is not None:
        from .arm64 import bench_arm64

        doc = run_guarded(as_json, bench_arm64, targets or ["levit_128s"], arch=arch, weights=weights, init=init,
                          threads=threads, batch=batch, duration=duration, fast_math=fast_math,
                          runtimes=runtime or ["ort"], status=status, images=[images] if images else ())
        if as_json:
            print(json.dumps(doc, indent=2, default=str))
        else:
            from .arm64 import format_arm64
            print(format_arm64(doc))
        if not doc["ok"]:
            raise typer.Exit(EXIT_FAILED)
        return
    runtimes = runtime or installed_runtimes()
    unknown = sorted(set(runtimes) - {"torch", "ort", "openvino", "tensorrt", "coreml"})
    if unknown:
        fail(f"unknown runtime(s) {', '.join(unknown)}; choose torch, ort, openvino, tensorrt", as_json)
    precision = precision or ("fp16" if device.startswith("cuda") else "fp32")
    protocol = b.Protocol(threads=threads, batch=batch, warmup_s=warmup, duration_s=duration, device=device,
                          precision=precision)
    documents = []
    failed = False
    for target in targets or ["levit_128s"]:
        model, artifacts = run_guarded(as_json, _bench_target, target, weights, init)
        if device.startswith("cuda"):
            protocol.batch = run_guarded(as_json, b.largest_cuda_batch, model)
            status(f"largest power-of-two batch that fits: {protocol.batch}")
        from .parity import build_reference_set
        reference = run_guarded(as_json, build_reference_set, model, images=[images] if images else ())
        cases = b.build_cases(model, runtimes, protocol, artifacts=artifacts, reference=reference)
        status(f"{model.config.name}: {len(cases)} cases, {protocol.threads} thread(s), batch {protocol.batch}, "
               f"{protocol.duration_s:g}s each (Ctrl-C stops and prints what was measured)")
        results, interrupted = b.run_cases(cases, reference, protocol)
        if sweep_batches and not interrupted:
            sizes = [2 ** i for i in range(max_batch.bit_length()) if 2 ** i <= max_batch]
            for case, result in zip(cases, results):
                if result.status == "ok":
                    status(f"sweep {case.label} over batches {sizes} …")
                    try:
                        result.sweep = b.sweep(case, sizes, protocol)
                    except KeyboardInterrupt:
                        interrupted = True
                        break
        doc = b.report_document(results, protocol, interrupted, model.config.name)
        documents.append(doc)
        failed |= any(r.status != "ok" for r in results)
        if not as_json:
            print(f"\n{model.config.name} — {protocol.threads} thread(s), batch {protocol.batch}, "
                  f"{doc['machine']['cpu']['model']}{' (interrupted: partial results)' if interrupted else ''}")
            print(b.format_table(results))
        if plot is not None and sweep_batches:
            target_plot = plot if len(targets or [1]) == 1 else plot.with_stem(f"{plot.stem}-{model.config.name}")
            run_guarded(as_json, b.plot_sweep, results, target_plot, f"{model.config.name}, {protocol.threads} thread(s)")
            status(f"plot written to {target_plot}")
        if interrupted:
            break
    if as_json:
        print(json.dumps(documents[0] if len(documents) == 1 else documents, indent=2, default=str))
    if failed:
        raise typer.Exit(EXIT_FAILED)


def _bench_target(target: str, weights, init):
    """(reference model, artifacts to time) for a variant, checkpoint or artifact folder."""
    from .checkpoints import load_artifact_source
    from .manifest import is_artifact

    if is_artifact(target):
        return load_artifact_source(target), [Path(target)]
    return _load(target, weights, init), []


@app.command()
def predict(inputs: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
            model: str = typer.Option("levit_128s", help=MODEL_HELP + " Or an artifact folder."),
            weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
            init: str = typer.Option("pretrained", help=INIT_HELP),
            runtime: Optional[str] = typer.Option(None, help="ort (default), torch, openvino, tensorrt or coreml. "
                                                             "Without an artifact the model is exported once into "
                                                             "the cache, parity-checked, and reused."),
            topk: int = typer.Option(5, help="Classes to report per image."),
            batch: int = typer.Option(32, help="Images decoded and inferred together (bounds memory)."),
            threads: Optional[int] = typer.Option(None, help="Runtime threads [default: the runtime's own]."),
            labels: Optional[Path] = typer.Option(None, help="Class names, one per line, for non-ImageNet heads."),
            preprocess: Optional[str] = typer.Option(None, help="Override the transform: official, hf or timm "
                                                                "[default: the checkpoint's own, from the manifest]."),
            max_pixels: int = typer.Option(64_000_000, help="Refuse larger images (decompression-bomb guard)."),
            csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write one CSV row per input here."),
            images: Optional[Path] = typer.Option(None, help=IMAGES_HELP + " Used by the first export only."),
            as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Classify images: top-k ImageNet classes per image; bad files get an error and the rest go on."""
    import csv

    from .predict import Predictor
    from .preprocess import expand_inputs

    quiet_exporters()
    if preprocess is not None and preprocess not in ("official", "hf", "timm"):
        fail(f"--preprocess must be official, hf or timm, not {preprocess!r}", as_json)
    csv_file = run_guarded(as_json, open, csv_path, "w", newline="") if csv_path else None
    status(f"opening {model} …")
    predictor = run_guarded(as_json, Predictor, model, weights=weights, init=init, runtime=runtime,
                            threads=threads, labels=labels, preprocess=preprocess,
                            images=[images] if images else ())
    records, failed = [], 0
    writer = None
    try:
        if csv_file:
            writer = csv.writer(csv_file)
            writer.writerow(["path", "status", *[f"{f}{r}" for r in range(1, topk + 1) for f in ("label", "prob")],
                             "error"])
        paths = list(expand_inputs(inputs))
        tty = sys.stderr.isatty()
        for n, pred in enumerate(predictor.predict(paths, topk=topk, batch=batch, max_pixels=max_pixels), 1):
            if tty:
                print(f"\r{n}/{len(paths)} images", end="", file=sys.stderr, flush=True)
            failed += not pred.ok
            if as_json:
                records.append(pred.to_dict())
            elif pred.ok:
                best = ", ".join(f"{t['label']} {t['prob']:.1%}" for t in pred.topk)
                print(f"{pred.path}: {best}")
            if not pred.ok:
                print(f"error: {pred.error}", file=sys.stderr)
            if writer:
                cells = [c for t in pred.topk for c in (t["label"], f"{t['prob']:.6f}")]
                cells += [""] * (2 * topk - len(cells))
                writer.writerow([pred.path, "ok" if pred.ok else "error", *cells, pred.error or ""])
        if tty:
            print(file=sys.stderr)
    finally:
        predictor.close()
        if csv_file:
            csv_file.close()
    if as_json:
        print(json.dumps({"ok": failed == 0, "model": predictor.description, "preprocessing": predictor.spec.to_dict(),
                          "failed": failed, "results": records}, indent=2))
    if failed:
        status(f"{failed} of {len(paths)} inputs failed")
        raise typer.Exit(EXIT_FAILED)
    if not paths:
        fail("no images found in the given paths", as_json)


arm64_app = typer.Typer(help="ARM64 (Graviton): prepare the emulated aarch64 environment used on x86-64 hosts.")
app.add_typer(arm64_app, name="arm64")


@arm64_app.command("setup")
def arm64_setup(force: bool = typer.Option(False, help="Rebuild even if it exists."),
                as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Build, once, a cached aarch64 Python with numpy and onnxruntime, run through qemu-aarch64-static."""
    from .arm64 import Emulator

    info = run_guarded(as_json, Emulator().setup, status, force)
    if as_json:
        print(json.dumps({"ok": True, **info}, indent=2))
    else:
        print(f"ready: {info['python']} (aarch64) with numpy {info['numpy']} and onnxruntime {info['onnxruntime']}, "
              f"{info['qemu']}, in {info['sysroot']}")


@app.command()
def version():
    """Print the levit-deploy version."""
    print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
