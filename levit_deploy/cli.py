"""The ``levit-deploy`` command: argument handling and printing only; the work is in the library.

Commands: info, export, parity, bench, predict, val, backends, arm64 setup, version. Expected failures
print one line: exit 1 when a gate failed (parity, some images), exit 2 for bad input or environment.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .backends import backends, get_backend, runtimes, targets
from .families import all_variants, families

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Load, fuse, export, verify, benchmark and run efficient vision transformers "
                       "(LeViT, LightViT, LITv2).")

EXIT_FAILED = 1  # the work ran but its result failed a gate (parity, some images)
EXIT_ERROR = 2  # bad input or environment: nothing useful was produced


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .arm64 import Arm64Error
    from .artifacts import ManifestError
    from .backends import ExportError, RuntimeUnavailable
    from .checkpoints import CheckpointError
    from .env import MissingDependency
    from .preprocess import ImageError

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
    from .export import ExportParityError
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


def _load(model: str, weights: Optional[Path], init: str, entry: Optional[str] = None):
    from .checkpoints import load

    return load(model, weights=weights, init=init, entry=entry)


def _entry(ema: bool) -> Optional[str]:
    return "ema_model" if ema else None


MODEL_HELP = f"A variant name ({', '.join(all_variants())}) or a checkpoint file/folder of any family."
WEIGHTS_HELP = "Checkpoint for a variant name: any layout levit-deploy reads (file or folder; docs/formats.md)."
PREPROCESS_HELP = ("Override the eval transform with one of the model family's named ones ("
                   + "; ".join(f"{f.name}: {', '.join(f.specs)}" for f in families().values())
                   + ") [default: the checkpoint's own, from the manifest].")
EMA_HELP = "Load the EMA weights of a training checkpoint (its 'ema_model' entry) instead of 'model'."
INIT_HELP = ("For a variant name without --weights: 'pretrained' downloads the official release "
             "(cached, sha256-checked); 'random' uses seeded random weights (offline demos and tests).")
JSON_HELP = "Print one JSON document on stdout instead of a table."
IMAGES_HELP = ("A folder of your own images, added to the parity inputs as their own kind (the bundled "
               "photos, noise and synthetic JPEGs are always used).")
TARGET_HELP = f"Export target: {', '.join(targets())} (see `levit-deploy backends`)."
OPTION_HELP = ("A target's own option as KEY=VALUE (repeatable); an option the target does not take is refused. "
               + " ".join(f"{b.name}: {'; '.join(o.split(':')[0] for o in b.option_help())}."
                          for b in backends().values() if b.option_help()))
RUNTIME_HELP = f"Runtime: {', '.join(runtimes())} (repeatable)."


def parse_options(pairs: list[str], as_json: bool) -> dict[str, str]:
    """KEY=VALUE strings as a dict; the backend types and checks them."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--option takes KEY=VALUE, got {pair!r}", as_json)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


@app.command()
def info(path: str = typer.Argument(..., help=MODEL_HELP),
         weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
         init: str = typer.Option("pretrained", help=INIT_HELP),
         ema: bool = typer.Option(False, "--ema", help=EMA_HELP),
         as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Show what a checkpoint is: family, layout, variant, classes, parameters, FLOPs, what else it holds."""
    from .families import family_of
    from .families.base import count_parameters

    model = run_guarded(as_json, _load, path, weights, init, _entry(ema))
    family = family_of(model)
    result = {**model.load_info.to_dict(), "params": count_parameters(model),
              "flops": family.count_flops(model.config), "config": model.config.to_dict()}
    if as_json:
        print(json.dumps({"ok": True, **result}, indent=2))
        return
    li = model.load_info
    print(f"source      {li.source}")
    print(f"family      {family.title}")
    print(f"layout      {li.layout}, {li.file_format or '-'}"
          + "".join(f", {k} {v}" for k, v in li.details.items()))
    print(f"variant     {li.variant}, {li.num_classes} classes")
    print(f"parameters  {result['params']:,}")
    print(f"FLOPs       {result['flops'] / 1e6:.0f} M multiply-adds per image")
    if li.sha256:
        print(f"sha256      {li.sha256}")
    for name, what in li.entries.items():
        used = "  <- loaded" if name == li.entry else ""
        print(f"entry       {name}: {what}{used}")
    for note in li.notes:
        print(f"note        {note}")


@app.command()
def export(model: str = typer.Argument(..., help=MODEL_HELP),
           to: str = typer.Option(..., "--to", help=TARGET_HELP),
           weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
           init: str = typer.Option("pretrained", help=INIT_HELP),
           out: Optional[Path] = typer.Option(None, help="Output folder [default: ./<variant>-<target>-<precision>]."),
           precision: str = typer.Option("fp32", help="fp32, fp16, bf16 or int8, as the target supports "
                                                      "(`levit-deploy backends`). int8 is post-training "
                                                      "quantization (onnx: ONNX Runtime QDQ; openvino: NNCF), "
                                                      "gated on cosine >= 0.99 and top-1 agreement >= 95 % on "
                                                      "decoded images."),
           calib: Optional[Path] = typer.Option(None, help="int8: a folder of your own images to calibrate on "
                                                           "(~300 recommended; more are sampled evenly) [default: "
                                                           "a stand-in from the bundled photos, with a warning]."),
           batch: str = typer.Option("dynamic", help="'dynamic' or a fixed batch size."),
           img_size: Optional[int] = typer.Option(None, help="Input size; every family runs at its own size "
                                                                  "only (224), so another one is refused with the reason."),
           option: List[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
           images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
           ema: bool = typer.Option(False, "--ema", help=EMA_HELP),
           triton_repo: Optional[Path] = typer.Option(None, help="Also add the artifact, once it passed, to this "
                                                                 "Triton model repository (onnx, openvino, tensorrt; "
                                                                 "defaults of `levit-deploy triton`)."),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Fuse a model, export it, and keep the artifact only if it passes the parity gate."""
    from .export import ExportParityError
    from .export import export as do_export
    from .fuse import FusionError

    quiet_exporters()
    options = parse_options(option, as_json)
    run_guarded(as_json, lambda: get_backend(to).parse_options(options))  # refuse bad options before loading
    if triton_repo is not None:
        from .triton import servable
        run_guarded(as_json, servable, to)
    status(f"loading {model} …")
    ref = run_guarded(as_json, _load, model, weights, init, _entry(ema))
    out = out or Path(f"{ref.config.name}-{to}-{precision}")
    status(f"fusing, exporting to {to} ({precision}), checking parity …")
    try:
        calibration = None
        if precision == "int8":
            from .calibration import calibration_set
            from .families import spec_for_model
            calibration = calibration_set(spec_for_model(ref), calib)
            status(f"calibrating on {len(calibration.inputs)} images from {calibration.source}"
                   + (f" ({len(calibration.skipped)} unreadable files skipped)" if calibration.skipped else ""))
            if calibration.warning():
                status(f"WARNING: {calibration.warning()}")
        artifact = do_export(ref, to, out, precision=precision, batch=batch, img_size=img_size,
                             images=[images] if images else (), options=options, calib=calib,
                             calibration=calibration, status=status)
    except (ExportParityError, FusionError) as e:
        if as_json:
            print(json.dumps({"ok": False, "error": str(e), "parity": e.report.to_dict()}))
        else:
            print(format_kinds(e.report), file=sys.stderr)
            for note in e.report.notes:
                print(f"note: {note}", file=sys.stderr)
        fail(str(e), as_json=False, code=EXIT_FAILED)
    except _expected_errors() as e:
        fail(str(e), as_json)
    m = artifact.manifest
    served = None
    if triton_repo is not None:
        from .triton import write_repository
        served = run_guarded(as_json, write_repository, artifact.folder, triton_repo)
    if as_json:
        print(json.dumps({"ok": True, "artifact": str(artifact.path), "manifest": m,
                          **({"triton_model": str(served)} if served else {})}, indent=2, default=str))
        return
    print(f"artifact    {artifact.path}  ({m['artifact']['size_bytes'] / 1e6:.1f} MB)")
    if served:
        print(f"triton      {served} (config.pbtxt, 1/, labels.txt)")
    print(f"manifest    {artifact.folder / 'manifest.json'}")
    for step in m["fusion"]:
        print(f"fusion      {step['step']}: worst e/bound {step['worst_margin']:.2g}, max e/s "
              f"{step['max_e_over_s']:.1e} ok")
    for op, form in m["model"].get("implementation_choices", {}).items():
        print(f"chosen      {op}: {form} (the fastest measured form for {m['artifact']['format']})")
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
    recipe = m["export"].get("calibration", {}).get("recipe")
    if recipe:
        kept = recipe["keep_float"]
        print(f"int8        {len(kept)} of {recipe['quantized_layers']} quantized layers kept in float"
              + (f": {', '.join(kept)} (replay: -o keep_float={','.join(kept)})" if kept else ""))
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
           ema: bool = typer.Option(False, "--ema", help=EMA_HELP),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Check the chain reference fp64 -> reference fp32 -> each fusion step -> each artifact.

    Every stage is judged input by input: its error e must stay within max(tol·s, 4·floor), where the
    floor is the original model's own error in that precision on that input (see README, Parity).
    """
    from .parity_chain import run_chain

    reports = run_guarded(as_json, run_chain, model, weights=weights, init=init, artifacts=artifact,
                          images=images, noise=noise, synthetic=synthetic, entry=_entry(ema))
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


@app.command()
def bench(targets: List[str] = typer.Argument(None, help="Variant names, checkpoints or artifact folders "
                                                    "[default: levit_128s]."),
          runtime: List[str] = typer.Option([], "--runtime", "-r", help=RUNTIME_HELP + " [default: every one "
                                                                                  "that can run here]"),
          weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
          init: str = typer.Option("pretrained", help=INIT_HELP),
          threads: int = typer.Option(1, help="Threads per runtime (the paper: 1 on CPU)."),
          batch: int = typer.Option(16, help="Batch size (the paper: 16 on CPU)."),
          sweep_batches: bool = typer.Option(False, "--sweep", help="Also measure throughput over batch 1..--max-batch."),
          max_batch: int = typer.Option(64, help="Largest batch of --sweep (powers of two)."),
          device: str = typer.Option("cpu", help="cpu or cuda (cuda: largest power-of-two batch that fits)."),
          precision: List[str] = typer.Option([], help="fp32, fp16, bf16 or int8 (repeatable: side by side in one "
                                                        "run): each runtime computes in it (autocast, inference "
                                                        "precision) or runs an artifact exported in it (int8: "
                                                        "calibrated on the stand-in set) [default: fp32 on cpu, "
                                                        "fp16 on cuda as the paper]; parity follows it."),
          duration: float = typer.Option(10.0, help="Timed seconds per case (rounds are interleaved)."),
          warmup: float = typer.Option(2.0, help="Warm-up seconds before timing."),
          arch: Optional[str] = typer.Option(None, help="arm64: Graviton presets natively, or emulated parity on x86-64."),
          fast_math: bool = typer.Option(False, "--bf16-fast-math", help="arm64: opt into bf16 fast-math GEMM "
                                                                             "(parity then uses the bf16 rule)."),
          plot: Optional[Path] = typer.Option(None, help="Write the --sweep curve to this PNG (needs matplotlib)."),
          images: Optional[Path] = typer.Option(None, help=IMAGES_HELP),
          ema: bool = typer.Option(False, "--ema", help=EMA_HELP),
          as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Time models side by side with the paper's protocol (1 thread, batch 16 on CPU): several variants,
    of any families, in one run."""
    from . import bench as b

    quiet_exporters()
    extra_images = [images] if images else ()
    if arch is not None:
        from .arm64 import bench_arm64, format_arm64

        doc = run_guarded(as_json, bench_arm64, targets or ["levit_128s"], arch=arch, weights=weights, init=init,
                          threads=threads, batch=batch, duration=duration, fast_math=fast_math,
                          runtimes=runtime or ["ort"], status=status, images=extra_images, entry=_entry(ema))
        print(json.dumps(doc, indent=2, default=str) if as_json else format_arm64(doc))
        if not doc["ok"]:
            raise typer.Exit(EXIT_FAILED)
        return
    protocol = b.Protocol(threads=threads, batch=batch, warmup_s=warmup, duration_s=duration, device=device,
                          precision=precision[0] if precision else ("fp16" if device.startswith("cuda") else "fp32"),
                          precisions=list(precision))
    documents, interrupted = run_guarded(as_json, b.run_bench, targets or ["levit_128s"], runtime, weights, init,
                                         protocol, max_batch if sweep_batches else None, plot, extra_images, status,
                                         _entry(ema))
    if as_json:
        print(json.dumps(documents[0] if len(documents) == 1 else documents, indent=2, default=str))
    else:
        results = [b.BenchResult(**r) for doc in documents for r in doc["results"]]
        models = [doc["model"] for doc in documents for _ in doc["results"]]
        interrupted = any(doc["interrupted"] for doc in documents)
        print(f"\n{', '.join(doc['model'] for doc in documents)} — {protocol.threads} thread(s), batch "
              f"{documents[-1]['protocol']['batch']}, {documents[0]['machine']['cpu']['model']}"
              f"{' (interrupted: partial results)' if interrupted else ''}")
        print(b.format_table(results, models if len(documents) > 1 else None))
        for doc in documents:
            if doc.get("plot"):
                status(f"plot written to {doc['plot']}")
    if any(r["status"] != "ok" for doc in documents for r in doc["results"]):
        raise typer.Exit(EXIT_FAILED)


@app.command()
def predict(inputs: List[str] = typer.Argument(..., help="Image files and/or folders (searched recursively); with "
                                                         "--ray also URIs Ray can read (s3://...)."),
            model: str = typer.Option("levit_128s", help=MODEL_HELP + " Or an artifact folder."),
            weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
            init: str = typer.Option("pretrained", help=INIT_HELP),
            runtime: Optional[str] = typer.Option(None, help=RUNTIME_HELP.rstrip(" (repeatable).") + ". Without an "
                                                             "artifact the model is exported once into the cache, "
                                                             "parity-checked, and reused [default: the first that "
                                                             "can run here]."),
            topk: int = typer.Option(5, help="Classes to report per image."),
            batch: int = typer.Option(32, help="Images decoded and inferred together (bounds memory)."),
            threads: Optional[int] = typer.Option(None, help="Runtime threads [default: the runtime's own]."),
            labels: Optional[Path] = typer.Option(None, help="Class names, one per line, for non-ImageNet heads."),
            preprocess: Optional[str] = typer.Option(None, help=PREPROCESS_HELP),
            max_pixels: int = typer.Option(64_000_000, help="Refuse larger images (decompression-bomb guard)."),
            csv_path: Optional[Path] = typer.Option(None, "--csv", help="Also write one CSV row per input here."),
            images: Optional[Path] = typer.Option(None, help=IMAGES_HELP + " Used by the first export only."),
            ema: bool = typer.Option(False, "--ema", help=EMA_HELP),
            use_ray: bool = typer.Option(False, "--ray", help="Run on Ray Data: a pool of actors, each with one runtime, "
                                                              "results written as Parquet to --output."),
            address: Optional[str] = typer.Option(None, help="--ray: the cluster to join (e.g. ray://head:10001 or "
                                                             "auto) [default: start a local Ray]."),
            actors: int = typer.Option(1, help="--ray: actors in the pool (one CPU and one runtime each)."),
            output: Path = typer.Option(Path("predictions"), help="--ray: folder for the Parquet files."),
            as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Classify images: top-k ImageNet classes per image; bad files get an error and the rest go on."""
    import csv

    from .predict import Predictor
    from .preprocess import expand_inputs

    quiet_exporters()
    if use_ray:
        from .predict import artifact_folder
        from .ray_predict import predict_on_ray

        ignored = [flag for flag, given in (("--labels", labels), ("--preprocess", preprocess), ("--csv", csv_path))
                   if given]
        if ignored:
            fail(f"{', '.join(ignored)}: not taken with --ray (the artifact's own labels and preprocessing are used; "
                 f"the results are Parquet in --output)", as_json)

        status(f"opening {model} …")
        folder = run_guarded(as_json, artifact_folder, model, weights, init, runtime, [images] if images else (),
                             _entry(ema))
        summary = run_guarded(as_json, predict_on_ray, folder, inputs, output, actors=actors, batch=batch, topk=topk,
                              threads=threads or 1, address=address, max_pixels=max_pixels)
        if as_json:
            print(json.dumps({"ok": summary["failed"] == 0, "artifact": str(folder), **summary}))
        else:
            print(f"{summary['rows']} rows ({summary['failed']} with errors) written to {summary['output']} "
                  f"(Parquet: path, ok, error, indices, labels, probs)")
        if summary["failed"]:
            raise typer.Exit(EXIT_FAILED)
        return
    csv_file = run_guarded(as_json, open, csv_path, "w", newline="") if csv_path else None
    status(f"opening {model} …")
    predictor = run_guarded(as_json, Predictor, model, weights=weights, init=init, runtime=runtime,
                            threads=threads, labels=labels, preprocess=preprocess,
                            images=[images] if images else (), entry=_entry(ema))
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


@app.command()
def val(data: Path = typer.Argument(..., help="A labelled image set: class folders named by ImageNet synset "
                                             "(n01440764/...) or class index, or a CSV of path,label rows."),
        model: List[str] = typer.Option(["levit_128s"], "--model", "-m",
                                        help=MODEL_HELP + " Or an artifact folder (repeatable: one pass over the "
                                                          "images for all; artifacts are shown beside their source "
                                                          "checkpoint)."),
        init: str = typer.Option("pretrained", help=INIT_HELP),
        limit: Optional[int] = typer.Option(None, help="Evaluate only the first N images (in sorted order)."),
        batch: int = typer.Option(32, help="Images decoded and inferred together (bounds memory)."),
        threads: Optional[int] = typer.Option(None, help="Runtime threads [default: the runtime's own]."),
        max_pixels: int = typer.Option(64_000_000, help="Refuse larger images (decompression-bomb guard)."),
        as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Top-1 / top-5 accuracy on your labelled images, each model beside its reference checkpoint."""
    from .val import contenders_for, evaluate, read_dataset

    quiet_exporters()
    samples = run_guarded(as_json, read_dataset, data, limit)
    status(f"{len(samples)} labelled images in {data}; opening {len(model)} model(s) …")
    contenders, references = run_guarded(as_json, contenders_for, model, init, threads)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            filled = int(30 * done / total)
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} images", end="", file=sys.stderr,
                  flush=True)

    report = run_guarded(as_json, evaluate, samples, contenders, references, batch, max_pixels, str(data), progress)
    if tty:
        print(file=sys.stderr)
    for bad in report.failed:
        print(f"error: {bad['error']}", file=sys.stderr)
    if report.evaluated == 0:
        fail(f"{data}: none of the {report.images} images could be read", as_json)
    if as_json:
        print(json.dumps({"ok": not report.failed, **report.to_dict()}, indent=2))
    else:
        width = max(len(r.name) for r in report.results)
        print(f"{'model':<{width}}  {'runtime':<8} {'prec':<5} {'top-1':>7} {'top-5':>7}  {'ref top-1':>9} "
              f"{'ref top-5':>9}  differ from ref")
        for r in report.results:
            differ = "(is the reference)" if r.is_reference else f"{r.differ}/{r.n} ({r.differ / max(r.n, 1):.1%})"
            print(f"{r.name:<{width}}  {r.runtime:<8} {r.precision:<5} {r.top1:>7.2%} {r.top5:>7.2%}  "
                  f"{r.reference_top1:>9.2%} {r.reference_top5:>9.2%}  {differ}")
        print(f"{report.evaluated} images evaluated, {len(report.failed)} could not be read")
    if report.failed:
        raise typer.Exit(EXIT_FAILED)


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


@app.command("serve")
def serve_http(model: str = typer.Argument(..., help="An artifact folder, or a model (exported once into the cache)."),
               replicas: int = typer.Option(1, help="Serving replicas (one CPU and one runtime each)."),
               max_batch: int = typer.Option(16, help="Largest batch a replica infers at once (serve.batch)."),
               batch_wait_ms: float = typer.Option(10.0, help="How long a replica waits to fill a batch."),
               port: int = typer.Option(8000, help="HTTP port."),
               host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for every one)."),
               topk: int = typer.Option(5, help="Classes per answer."),
               threads: int = typer.Option(1, help="Runtime threads per replica."),
               max_bytes: int = typer.Option(20 * 1024 * 1024, help="Largest request body (413 above it)."),
               body_timeout: float = typer.Option(10.0, help="Seconds a request body may take (408 after them)."),
               max_queued: int = typer.Option(128, help="Requests waiting beyond the replicas' 4*max-batch "
                                                        "(503 above it; -1: no limit)."),
               address: Optional[str] = typer.Option(None, help="A Ray cluster to join [default: a local Ray]."),
               weights: Optional[Path] = typer.Option(None, help=WEIGHTS_HELP),
               init: str = typer.Option("pretrained", help=INIT_HELP),
               runtime: Optional[str] = typer.Option(None, help="Runtime of the export, for a model that is not "
                                                                "an artifact [default: the first that can run here]."),
               as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Serve top-k classification over HTTP on Ray Serve: POST image bytes to /, GET /healthz. Ctrl-C stops."""
    import time

    from .predict import artifact_folder
    from .serve import start

    quiet_exporters()
    folder = run_guarded(as_json, artifact_folder, model, weights, init, runtime)
    url = run_guarded(as_json, start, folder, host, port, replicas, max_batch, batch_wait_ms, topk, threads, max_bytes,
                      address, body_timeout, max_queued)
    if as_json:
        print(json.dumps({"ok": True, "url": url, "artifact": str(folder)}), flush=True)
    else:
        print(f"serving {folder} at {url}  (curl --data-binary @image.jpg {url}; GET {url}healthz; Ctrl-C stops)",
              flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        from .serve import APP
        serve.delete(APP)  # only our application: a shared cluster's other Serve apps keep running
        if address is None:
            serve.shutdown()


@app.command()
def triton(artifact: Path = typer.Argument(..., help="An artifact folder (onnx, openvino or tensorrt) with its manifest."),
           repo: Path = typer.Option(..., help="The Triton model repository to add it to (created if missing)."),
           name: Optional[str] = typer.Option(None, help="Model name in the repository [default: VARIANT_FORMAT]."),
           max_batch: int = typer.Option(32, help="max_batch_size of a dynamic-batch artifact."),
           preferred_batch: List[int] = typer.Option([8, 16], help="dynamic_batching preferred sizes (repeatable)."),
           delay_us: int = typer.Option(2000, help="max_queue_delay_microseconds of the dynamic batcher."),
           instances: int = typer.Option(1, help="instance_group count."),
           threads: int = typer.Option(1, help="OpenVINO: INFERENCE_NUM_THREADS per instance."),
           as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """Write repo/NAME/config.pbtxt, repo/NAME/1/<model file> and labels.txt for Triton Inference Server; the
    config is parsed with Triton's own schema (tritonclient) when it is installed."""
    from .triton import TritonOptions, validate_config, write_repository

    options = TritonOptions(name, max_batch, tuple(preferred_batch), delay_us, instances, threads)
    folder = run_guarded(as_json, write_repository, artifact, repo, options)
    text = (folder / "config.pbtxt").read_text()
    checked = validate_config(text) is not None
    if as_json:
        print(json.dumps({"ok": True, "model": str(folder), "config": text, "schema_checked": checked}))
        return
    print(f"model       {folder}")
    print(f"config      {folder / 'config.pbtxt'}" + (" (parsed with Triton's ModelConfig schema)" if checked else
                                                      " (not schema-checked: pip install 'levit-deploy[triton]')"))
    print(f"serve with  docker run --rm -p8000:8000 -p8001:8001 -v {folder.parent.resolve()}:/models "
          f"nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models")


@app.command("backends")
def list_backends(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)):
    """The export targets and runtimes this levit-deploy knows, and which of them can run here."""
    rows = []
    for b in backends().values():
        rows.append({"target": b.name if b.write else None, "runtime": b.runtime, "installed": b.installed(),
                     "usable_here": b.usable(), "needs": b.needs, "extra": b.extra,
                     "export_precisions": list(b.precisions), "compute_precisions": list(b.compute_precisions),
                     "options": b.option_help(), "description": b.description})
    if as_json:
        print(json.dumps({"ok": True, "backends": rows}, indent=2))
        return
    table = [("target", "runtime", "here", "precisions", "install")]
    for r in rows:
        here = "yes" if r["usable_here"] else f"installed, needs {r['needs']}" if r["installed"] else "not installed"
        table.append((r["target"] or "-", r["runtime"], here, ", ".join(r["export_precisions"]) or "-",
                      f"levit-deploy[{r['extra']}]" if r["extra"] else "core"))
    print(_table(table))
    for r in rows:
        if r["options"]:
            print(f"\n{r['target']} options (-o KEY=VALUE):")
            for opt in r["options"]:
                print(f"  {opt}")


@app.command()
def version():
    """Print the levit-deploy version."""
    print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
