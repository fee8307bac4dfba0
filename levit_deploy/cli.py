"""The ``levit-deploy`` command: argument handling and printing only; the work is in the library.

Commands: info, export, parity, bench, optimize, predict, val, serve, triton, backends, arm64 setup, version. Expected
failures print one line: exit 1 when a gate failed (parity, some images), exit 2 for bad input or environment.
Options that several commands take are declared once, as the ``...Opt`` aliases below.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, List, NoReturn, Optional

import typer

from . import __version__
from .arm64 import Arm64Error, Emulator, bench_arm64, format_arm64
from .artifacts import ManifestError
from .backends import ExportError, RuntimeUnavailable, backends, get_backend, runtimes, targets
from .bench import BenchResult, Protocol, format_table, run_bench
from .checkpoints import CheckpointError, load
from .env import MissingDependency, text_table
from .export import ExportParityError
from .export import export as export_artifact
from .families import all_variants, families, family_of
from .families.base import count_parameters
from .fuse import FusionError
from .locate import LocateError, locate as locate_divergence
from .optimize import format_summary as format_optimize, optimize as run_optimize
from .parity import INT8_FLOOR_FACTOR, ParityReport
from .parity_chain import run_chain
from .predict import Predictor, artifact_folder, write_csv
from .preprocess import ImageError, expand_inputs
from .ray_predict import predict_on_ray
from .serve import run_until_interrupted, start
from .triton import TritonOptions, servable, validate_config, write_repository
from .val import contenders_for, evaluate, read_dataset

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Load, fuse, export, verify, benchmark and run efficient vision transformers "
                       "(LeViT, LightViT, LITv2).")

EXIT_FAILED = 1  # the work ran but its result failed a gate (parity, some images)
EXIT_ERROR = 2  # bad input or environment: nothing useful was produced
GATE_ERRORS = (FusionError, ExportParityError)
EXPECTED_ERRORS = (Arm64Error, CheckpointError, ExportError, LocateError, ManifestError, MissingDependency,
                   RuntimeUnavailable, ImageError, ValueError, OSError, KeyError)

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
PRECISION_HELP = ("fp32, fp16, bf16 or int8, as the target supports (`levit-deploy backends`). int8 is post-training "
                  "quantization (onnx: ONNX Runtime QDQ; openvino: NNCF; executorch: XNNPACK), gated per decoded "
                  f"image on its cosine to the fp64 output (>= 0.99, or within {INT8_FLOOR_FACTOR}x the original "
                  "model's own bf16 loss where that is larger) and on top-1 agreement >= 95 % over the images whose "
                  "top-1 bf16 keeps; when it fails, the most sensitive layers are kept in float until it passes "
                  "(-o keep_float=, -o max_float_fraction=).")
CALIB_HELP = ("int8: a folder of your own images to calibrate on (~300 recommended; more are sampled evenly) "
              "[default: a stand-in from the bundled photos, with a warning].")
BENCH_PRECISION_HELP = ("fp32, fp16, bf16 or int8 (repeatable: side by side in one run): each runtime computes in it "
                        "(autocast, inference precision) or runs an artifact exported in it (int8: calibrated on "
                        "the stand-in set) [default: fp32 on cpu, fp16 on cuda as the paper]; parity follows it.")

ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP)]
WeightsOpt = Annotated[Optional[Path], typer.Option(help=WEIGHTS_HELP)]
InitOpt = Annotated[str, typer.Option(help=INIT_HELP)]
EmaOpt = Annotated[bool, typer.Option("--ema", help=EMA_HELP)]
JsonOpt = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
ImagesOpt = Annotated[Optional[Path], typer.Option(help=IMAGES_HELP)]
DecodeBatchOpt = Annotated[int, typer.Option(help="Images decoded and inferred together (bounds memory).")]
ThreadsOpt = Annotated[Optional[int], typer.Option(help="Runtime threads [default: the runtime's own].")]
MaxPixelsOpt = Annotated[int, typer.Option(help="Refuse larger images (decompression-bomb guard).")]

FIELD_WIDTH = 12  # the label column of info, export and triton: "parity      PASSED ..."


def fail(message: str, as_json: bool, code: int = EXIT_ERROR) -> NoReturn:
    """One line on stderr (and {"ok": false} on stdout with --json), then exit: never a traceback."""
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def status(message: str) -> None:
    """Progress goes to stderr so that --json output on stdout stays machine-readable."""
    print(message, file=sys.stderr, flush=True)


class Progress:
    """A bar that redraws one stderr line while stderr is a terminal (nothing otherwise, so that logs and pipes
    stay clean); call it with (done, total), use it as a context manager to end the line."""

    def __init__(self, unit: str = "images"):
        self.unit, self.tty, self.shown = unit, sys.stderr.isatty(), False

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            filled = int(30 * done / max(total, 1))
            print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} {self.unit}", end="", file=sys.stderr,
                  flush=True)
            self.shown = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.shown:
            print(file=sys.stderr)


def run_guarded(as_json: bool, fn, *args, **kwargs):
    """Call into the library; a failed gate becomes one line and exit 1, known errors one line and exit 2."""
    try:
        return fn(*args, **kwargs)
    except GATE_ERRORS as e:
        fail(str(e), as_json, EXIT_FAILED)
    except EXPECTED_ERRORS as e:
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        fail(text, as_json)


def quiet_exporters() -> None:
    for name in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _entry(ema: bool) -> Optional[str]:
    return "ema_model" if ema else None


def parse_options(pairs: list[str], as_json: bool) -> dict[str, str]:
    """KEY=VALUE strings as a dict; the backend types and checks them."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--option takes KEY=VALUE, got {pair!r}", as_json)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def _field(label: str, value) -> str:
    """One "label       value" line of the key-value summaries."""
    return f"{label:<{FIELD_WIDTH - 2}}  {value}"


def format_parity_table(reports) -> str:
    """One row per stage: the worst input's e/bound (<= 1 passes) and what bounded it."""
    rows = [("stage", "prec", "worst e/bound", "max e/s", "bound: tol/floor", "cos min", "top-1", "result")]
    for r in reports:
        tol = sum(k.decided_by_tolerance for k in r.kinds if k.gating)
        floor = sum(k.decided_by_floor for k in r.kinds if k.gating)
        rows.append((r.stage, r.precision, f"{r.worst_margin:.2g}", f"{r.max_e_over_s:.1e}", f"{tol}/{floor}",
                     f"{r.min_cosine:.6f}", f"{r.top1_agreement:.0%}",
                     "PASS" if r.passed else "FAIL " + "; ".join(r.failures[:2])))
    text = text_table(rows)
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
    return text_table(rows, indent)


@app.command()
def info(path: ModelArg, weights: WeightsOpt = None, init: InitOpt = "pretrained", ema: EmaOpt = False,
         as_json: JsonOpt = False):
    """Show what a checkpoint is: family, layout, variant, classes, parameters, FLOPs, what else it holds."""
    model = run_guarded(as_json, load, path, weights=weights, init=init, entry=_entry(ema))
    family = family_of(model)
    result = {**model.load_info.to_dict(), "params": count_parameters(model),
              "flops": family.count_flops(model.config), "config": model.config.to_dict()}
    if as_json:
        print(json.dumps({"ok": True, **result}, indent=2))
        return
    li = model.load_info
    print(_field("source", li.source))
    print(_field("family", family.title))
    print(_field("layout", f"{li.layout}, {li.file_format or '-'}"
                           + "".join(f", {k} {v}" for k, v in li.details.items())))
    print(_field("variant", f"{li.variant}, {li.num_classes} classes"))
    print(_field("parameters", f"{result['params']:,}"))
    print(_field("FLOPs", f"{result['flops'] / 1e6:.0f} M multiply-adds per image"))
    if li.sha256:
        print(_field("sha256", li.sha256))
    for name, what in li.entries.items():
        print(_field("entry", f"{name}: {what}" + ("  <- loaded" if name == li.entry else "")))
    for note in li.notes:
        print(_field("note", note))


@app.command()
def export(model: ModelArg,
           to: Annotated[str, typer.Option("--to", help=TARGET_HELP)],
           weights: WeightsOpt = None,
           init: InitOpt = "pretrained",
           out: Annotated[Optional[Path], typer.Option(
               help="Output folder [default: ./<variant>-<target>-<precision>].")] = None,
           precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "fp32",
           calib: Annotated[Optional[Path], typer.Option(help=CALIB_HELP)] = None,
           batch: Annotated[str, typer.Option(help="'dynamic' or a fixed batch size.")] = "dynamic",
           img_size: Annotated[Optional[int], typer.Option(
               help="Input size; every family runs at its own size only (224), so another one is refused with "
                    "the reason.")] = None,
           option: Annotated[List[str], typer.Option("--option", "-o", help=OPTION_HELP)] = [],
           images: ImagesOpt = None,
           ema: EmaOpt = False,
           triton_repo: Annotated[Optional[Path], typer.Option(
               help="Also add the artifact, once it passed, to this Triton model repository (onnx, openvino, "
                    "tensorrt; defaults of `levit-deploy triton`).")] = None,
           locate_on_fail: Annotated[bool, typer.Option(
               "--locate-on-fail", help="When the gate refuses the artifact, find the first unit of the model "
                                        "where it diverges before discarding it (as `parity --locate`).")] = False,
           as_json: JsonOpt = False):
    """Fuse a model, export it, and keep the artifact only if it passes the parity gate."""
    quiet_exporters()
    options = parse_options(option, as_json)
    run_guarded(as_json, lambda: get_backend(to).parse_options(options))  # refuse bad options before loading
    if triton_repo is not None:
        run_guarded(as_json, servable, to)
    status(f"loading {model} …")
    ref = run_guarded(as_json, load, model, weights=weights, init=init, entry=_entry(ema))
    out = out or Path(f"{ref.config.name}-{to}-{precision}")
    status(f"fusing, exporting to {to} ({precision}), checking parity …")
    artifact = run_guarded(as_json, _export_or_report, as_json, ref, to, out, precision=precision, batch=batch,
                           img_size=img_size, images=[images] if images else (), options=options, calib=calib,
                           status=status, locate_on_fail=locate_on_fail)
    served = run_guarded(as_json, write_repository, artifact.folder, triton_repo) if triton_repo is not None else None
    if as_json:
        print(json.dumps({"ok": True, "artifact": str(artifact.path), "manifest": artifact.manifest,
                          **({"triton_model": str(served)} if served else {})}, indent=2, default=str))
        return
    _print_export(artifact, served)


def _export_or_report(as_json: bool, *args, **kwargs):
    """export(); when the gate refuses the artifact, the report of why (per input kind, or the whole parity with
    --json) comes before the one error line."""
    try:
        return export_artifact(*args, **kwargs)
    except GATE_ERRORS as e:
        if as_json:
            located = {"locate": e.located} if getattr(e, "located", None) is not None else {}
            print(json.dumps({"ok": False, "error": str(e), "parity": e.report.to_dict(), **located}))
        else:
            print(format_kinds(e.report), file=sys.stderr)
            for note in e.report.notes:
                print(f"note: {note}", file=sys.stderr)
        fail(str(e), as_json=False, code=EXIT_FAILED)


def _print_export(artifact, served: Optional[Path]) -> None:
    """What was written and why it was kept: files, fusion steps, implementation choices, parity, int8 recipe."""
    m = artifact.manifest
    print(_field("artifact", f"{artifact.path}  ({m['artifact']['size_bytes'] / 1e6:.1f} MB)"))
    if served:
        print(_field("triton", f"{served} (config.pbtxt, 1/, labels.txt)"))
    print(_field("manifest", artifact.folder / "manifest.json"))
    for step in m["fusion"]:
        print(_field("fusion", f"{step['step']}: worst e/bound {step['worst_margin']:.2g}, max e/s "
                               f"{step['max_e_over_s']:.1e} ok"))
    for op, form in m["model"].get("implementation_choices", {}).items():
        print(_field("chosen", f"{op}: {form} (the fastest measured form for {m['artifact']['format']})"))
    _print_parity_summary(m["parity"])
    recipe = m["export"].get("calibration", {}).get("recipe")
    if recipe:
        kept = recipe["keep_float"]
        print(_field("int8", f"{len(kept)} of {recipe['quantized_layers']} quantized layers kept in float"
                             + (f": {', '.join(kept)} (replay: -o keep_float={','.join(kept)})" if kept else "")))
    for note in m["export"]["notes"] + m["parity"].get("notes", []):
        print(_field("note", note))


def _print_parity_summary(p: dict) -> None:
    """The manifest's parity: the verdict and its margins, then the per-kind table under the label column."""
    if p["status"] == "pending":
        print(_field("parity", f"pending: {p['reason']}"))
        return
    report = ParityReport.from_dict(p)
    print(_field("parity", f"{p['status'].upper()} [{p['precision']}] on {p['inputs']}: worst e/bound "
                           f"{report.worst_margin:.2g} (<= 1 passes), max e/s {report.max_e_over_s:.1e}, cosine ≥ "
                           f"{report.min_cosine:.6f}, top-1 {report.top1_agreement:.0%}"))
    print(format_kinds(report, indent=" " * FIELD_WIDTH))


@app.command()
def parity(model: Annotated[str, typer.Argument(help=MODEL_HELP + " Or an artifact folder: its source is reloaded.")],
           weights: WeightsOpt = None,
           init: InitOpt = "pretrained",
           artifact: Annotated[List[Path], typer.Option(
               help="Artifact file or folder to add to the chain (repeatable).")] = [],
           images: ImagesOpt = None,
           noise: Annotated[int, typer.Option(
               help="Seeded N(0,1) tensors among the inputs (an input kind of its own).")] = 4,
           synthetic: Annotated[int, typer.Option(
               help="Procedural JPEGs among the inputs (an input kind of its own).")] = 4,
           ema: EmaOpt = False,
           locate: Annotated[bool, typer.Option(
               "--locate", help="MODEL is an artifact: when it fails, bisect prefixes of its graph for the first "
                                "unit of the model (stem, block, head) after which it diverges (ONNX, OpenVINO); "
                                "its files are only read.")] = False,
           as_json: JsonOpt = False):
    """Check the chain reference fp64 -> reference fp32 -> each fusion step -> each artifact.

    Every stage is judged input by input: its error e must stay within max(tol·s, 4·floor), where the
    floor is the original model's own error in that precision on that input (see README, Parity).
    With --locate, say where an artifact first diverges instead.
    """
    if locate:
        return _locate(model, images, as_json)
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


def _locate(artifact: str, images: Optional[Path], as_json: bool) -> None:
    """parity ARTIFACT --locate: the table of the cuts checked and the first divergent unit; exit 1 when one is."""
    report = run_guarded(as_json, locate_divergence, artifact, images, status)
    if as_json:
        print(json.dumps({"ok": report.first_divergent is None, "parity": report.output.to_dict(),
                          "locate": report.to_dict()}, indent=2))
    else:
        print(f"{report.output.stage} [{report.precision}]: {'PASS' if report.output.passed else 'FAIL'}")
        print(format_kinds(report.output))
        if report.checked:
            rows = [("after unit", "graph tensor", "worst e/bound", "min cosine", "worst input", "verdict")]
            rows += [(c.unit, c.tensor, f"{c.worst_e_over_bound:.3g}", f"{c.min_cosine:.6f}", c.worst_input,
                      "PASS" if c.passed else "FAIL") for c in report.checked]
            print(text_table(rows, right=(2, 3)))
        print(f"{report.units} units in the graph; {report.prefix_runs} prefix runs (at most {report.max_runs})"
              + (f"; merged into the next unit (no weights in the graph): {', '.join(report.unmapped)}"
                 if report.unmapped else ""))
        if report.int8_ranking:
            print("int8 layers by error contribution (1 - cos when quantized alone): " + ", ".join(
                f"{name} {score:.2g}" for name, score in report.int8_ranking[:8]))
        first = report.first_divergent
        print(f"first divergent unit: {first.unit} (worst e/bound {first.worst_e_over_bound:.3g} on {first.worst_input})"
              if first else "no unit diverges: the artifact passes")
    if report.first_divergent is not None:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def bench(targets: Annotated[List[str], typer.Argument(
              help="Variant names, checkpoints or artifact folders [default: levit_128s].")] = None,
          runtime: Annotated[List[str], typer.Option(
              "--runtime", "-r", help=RUNTIME_HELP + " [default: every one that can run here]")] = [],
          weights: WeightsOpt = None,
          init: InitOpt = "pretrained",
          threads: Annotated[int, typer.Option(help="Threads per runtime (the paper: 1 on CPU).")] = 1,
          batch: Annotated[int, typer.Option(help="Batch size (the paper: 16 on CPU).")] = 16,
          sweep_batches: Annotated[bool, typer.Option(
              "--sweep", help="Also measure throughput over batch 1..--max-batch.")] = False,
          max_batch: Annotated[int, typer.Option(help="Largest batch of --sweep (powers of two).")] = 64,
          device: Annotated[str, typer.Option(
              help="cpu or cuda (cuda: largest power-of-two batch that fits).")] = "cpu",
          precision: Annotated[List[str], typer.Option(help=BENCH_PRECISION_HELP)] = [],
          duration: Annotated[float, typer.Option(help="Timed seconds per case (rounds are interleaved).")] = 10.0,
          warmup: Annotated[float, typer.Option(help="Warm-up seconds before timing.")] = 2.0,
          arch: Annotated[Optional[str], typer.Option(
              help="arm64: Graviton presets natively, or emulated parity on x86-64.")] = None,
          fast_math: Annotated[bool, typer.Option(
              "--bf16-fast-math",
              help="arm64: opt into bf16 fast-math GEMM (parity then uses the bf16 rule).")] = False,
          plot: Annotated[Optional[Path], typer.Option(
              help="Write the --sweep curve to this PNG (needs matplotlib).")] = None,
          images: ImagesOpt = None,
          baseline: Annotated[Optional[Path], typer.Option(
              help="An earlier `bench --json` output: each case is tested against the same case there "
                   "(permutation test on per-round times; 'significantly faster/slower' needs p < 0.05 and a "
                   "difference of at least 10 %).")] = None,
          cold_start: Annotated[bool, typer.Option(
              "--cold-start/--no-cold-start",
              help="Also open each case in a fresh process after timing: cold start (open + first "
                   "inference) and peak resident memory.")] = True,
          ema: EmaOpt = False,
          as_json: JsonOpt = False):
    """Time models side by side with the paper's protocol (1 thread, batch 16 on CPU): several variants,
    of any families, in one run. Reports images/s with a bootstrap 95 % interval of the median, latency
    percentiles, and per case the cold start and peak memory of a fresh process."""
    quiet_exporters()
    models, extra_images = targets or ["levit_128s"], [images] if images else ()
    if arch is not None:
        doc = run_guarded(as_json, bench_arm64, models, arch=arch, weights=weights, init=init, threads=threads,
                          batch=batch, duration=duration, fast_math=fast_math, runtimes=runtime or ["ort"],
                          status=status, images=extra_images, entry=_entry(ema))
        print(json.dumps(doc, indent=2, default=str) if as_json else format_arm64(doc))
        if not doc["ok"]:
            raise typer.Exit(EXIT_FAILED)
        return
    protocol = Protocol(threads=threads, batch=batch, warmup_s=warmup, duration_s=duration, device=device,
                        precision=precision[0] if precision else ("fp16" if device.startswith("cuda") else "fp32"),
                        precisions=list(precision), cold_start=cold_start)
    documents, interrupted = run_guarded(as_json, run_bench, models, runtime, weights, init, protocol,
                                         max_batch if sweep_batches else None, plot, extra_images, status,
                                         _entry(ema), baseline)
    if as_json:
        print(json.dumps(documents[0] if len(documents) == 1 else documents, indent=2, default=str))
    else:
        _print_bench(documents, protocol, interrupted)
    if any(r["status"] != "ok" for doc in documents for r in doc["results"]):
        raise typer.Exit(EXIT_FAILED)


def _print_bench(documents: list[dict], protocol: Protocol, interrupted: bool) -> None:
    """One table for every model benched (a model column when there are several), under what was measured."""
    results = [BenchResult(**r) for doc in documents for r in doc["results"]]
    models = [doc["model"] for doc in documents for _ in doc["results"]]
    print(f"\n{', '.join(doc['model'] for doc in documents)} — {protocol.threads} thread(s), batch "
          f"{documents[-1]['protocol']['batch']}, {documents[0]['machine']['cpu']['model']}"
          f"{' (interrupted: partial results)' if interrupted else ''}")
    print(format_table(results, models if len(documents) > 1 else None))
    for doc in documents:
        if doc.get("plot"):
            status(f"plot written to {doc['plot']}")


@app.command()
def optimize(model: ModelArg,
             weights: WeightsOpt = None,
             init: InitOpt = "pretrained",
             calib: Annotated[Optional[Path], typer.Option(help=CALIB_HELP)] = None,
             images: ImagesOpt = None,
             objective: Annotated[str, typer.Option(
                 help="throughput (batch 16, the paper's protocol) or latency (batch 1, lowest median).")
             ] = "throughput",
             targets: Annotated[List[str], typer.Option(
                 help="Export targets to try (repeat or comma-separate) [default: every one that runs here].")] = [],
             precisions: Annotated[List[str], typer.Option(
                 help="fp32, bf16 (fp32 artifact computed in bf16, where the CPU has it), int8 (with the "
                      "float-fallback remedy) [default: all three; those that cannot run here are left out].")] = [],
             out: Annotated[Path, typer.Option(
                 help="Output folder: best/ (the chosen artifact), candidates/, report.md/.png/.json.")] = Path(
                 "optimized"),
             duration: Annotated[float, typer.Option(help="Timed seconds per candidate (interleaved).")] = 10.0,
             threads: Annotated[int, typer.Option(help="Threads per runtime (the paper: 1 on CPU).")] = 1,
             ema: EmaOpt = False,
             as_json: JsonOpt = False):
    """Find the fastest artifact that passes its gate on this machine: export and gate every target x precision
    that runs here, time the passing ones side by side with PyTorch eager as the baseline, keep the fastest, and
    write a report (table, plot of speed against accuracy, JSON)."""
    quiet_exporters()
    split = lambda values: [v.strip() for value in values for v in value.split(",") if v.strip()]  # noqa: E731
    with Progress("candidates") as progress:
        result = run_guarded(as_json, run_optimize, model, out, weights=weights, init=init, entry=_entry(ema),
                             calib=calib, images=[images] if images else (), objective=objective,
                             targets=split(targets) or None, precisions=split(precisions) or None,
                             duration=duration, threads=threads, command=" ".join(["levit-deploy", *sys.argv[1:]]),
                             status=status, progress=progress)
    print(json.dumps(result.to_dict(), indent=2, default=str) if as_json else format_optimize(result))
    if result.best is None or result.interrupted:
        raise typer.Exit(EXIT_FAILED)


@app.command()
def predict(inputs: Annotated[List[str], typer.Argument(
                help="Image files and/or folders (searched recursively); with --ray also URIs Ray can read "
                     "(s3://...).")],
            model: Annotated[str, typer.Option(help=MODEL_HELP + " Or an artifact folder.")] = "levit_128s",
            weights: WeightsOpt = None,
            init: InitOpt = "pretrained",
            runtime: Annotated[Optional[str], typer.Option(
                help=RUNTIME_HELP.rstrip(" (repeatable).") + ". Without an artifact the model is exported once "
                     "into the cache, parity-checked, and reused [default: the first that can run here].")] = None,
            topk: Annotated[int, typer.Option(help="Classes to report per image.")] = 5,
            batch: DecodeBatchOpt = 32,
            threads: ThreadsOpt = None,
            labels: Annotated[Optional[Path], typer.Option(
                help="Class names, one per line, for non-ImageNet heads.")] = None,
            preprocess: Annotated[Optional[str], typer.Option(help=PREPROCESS_HELP)] = None,
            max_pixels: MaxPixelsOpt = 64_000_000,
            csv_path: Annotated[Optional[Path], typer.Option(
                "--csv", help="Also write one CSV row per input here.")] = None,
            images: Annotated[Optional[Path], typer.Option(
                help=IMAGES_HELP + " Used by the first export only.")] = None,
            ema: EmaOpt = False,
            use_ray: Annotated[bool, typer.Option(
                "--ray", help="Run on Ray Data: a pool of actors, each with one runtime, results written as Parquet "
                              "to --output.")] = False,
            address: Annotated[Optional[str], typer.Option(
                help="--ray: the cluster to join (e.g. ray://head:10001 or auto) [default: start a local "
                     "Ray].")] = None,
            actors: Annotated[int, typer.Option(help="--ray: actors in the pool (one CPU and one runtime each).")] = 1,
            output: Annotated[Path, typer.Option(help="--ray: folder for the Parquet files.")] = Path("predictions"),
            as_json: JsonOpt = False):
    """Classify images: top-k ImageNet classes per image; bad files get an error and the rest go on."""
    quiet_exporters()
    extra_images = [images] if images else ()
    if use_ray:
        _refuse_with_ray(as_json, **{"--labels": labels, "--preprocess": preprocess, "--csv": csv_path})
        status(f"opening {model} …")
        folder = run_guarded(as_json, artifact_folder, model, weights, init, runtime, extra_images, _entry(ema))
        summary = run_guarded(as_json, predict_on_ray, folder, inputs, output, actors=actors, batch=batch, topk=topk,
                              threads=threads or 1, address=address, max_pixels=max_pixels)
        _finish_ray(summary, folder, as_json)
        return
    csv_file = run_guarded(as_json, open, csv_path, "w", newline="") if csv_path else None
    status(f"opening {model} …")
    predictor = run_guarded(as_json, Predictor, model, weights=weights, init=init, runtime=runtime, threads=threads,
                            labels=labels, preprocess=preprocess, images=extra_images, entry=_entry(ema))
    try:
        paths = list(expand_inputs(inputs))
        predictions = predictor.predict(paths, topk=topk, batch=batch, max_pixels=max_pixels)
        records, failed = _show_predictions(write_csv(predictions, csv_file, topk) if csv_file else predictions,
                                            len(paths), as_json)
    finally:
        predictor.close()
        if csv_file:
            csv_file.close()
    if as_json:
        print(json.dumps({"ok": failed == 0, "model": predictor.description, "preprocessing": predictor.spec.to_dict(),
                          "failed": failed, "results": records}, indent=2))
    _finish_predict(failed, len(paths), as_json)


def _refuse_with_ray(as_json: bool, **given) -> None:
    """Options that --ray does not take are refused, not silently dropped."""
    ignored = [flag for flag, value in given.items() if value]
    if ignored:
        fail(f"{', '.join(ignored)}: not taken with --ray (the artifact's own labels and preprocessing are used; "
             f"the results are Parquet in --output)", as_json)


def _finish_ray(summary: dict, folder: Path, as_json: bool) -> None:
    """Where the Parquet went, and exit 1 if any row holds an error."""
    if as_json:
        print(json.dumps({"ok": summary["failed"] == 0, "artifact": str(folder), **summary}))
    else:
        print(f"{summary['rows']} rows ({summary['failed']} with errors) written to {summary['output']} "
              f"(Parquet: path, ok, error, indices, labels, probs)")
    if summary["failed"]:
        raise typer.Exit(EXIT_FAILED)


def _show_predictions(predictions, total: int, as_json: bool) -> tuple[list[dict], int]:
    """Print each prediction as it comes (kept for the JSON document instead with --json), each bad file's error
    on stderr; returns (the JSON records, how many failed)."""
    records, failed = [], 0
    with Progress() as progress:
        for n, pred in enumerate(predictions, 1):
            progress(n, total)
            failed += not pred.ok
            if as_json:
                records.append(pred.to_dict())
            elif pred.ok:
                print(f"{pred.path}: " + ", ".join(f"{t['label']} {t['prob']:.1%}" for t in pred.topk))
            if not pred.ok:
                print(f"error: {pred.error}", file=sys.stderr)
    return records, failed


def _finish_predict(failed: int, total: int, as_json: bool) -> None:
    """Exit 1 if some inputs failed, 2 if there were none."""
    if failed:
        status(f"{failed} of {total} inputs failed")
        raise typer.Exit(EXIT_FAILED)
    if not total:
        fail("no images found in the given paths", as_json)


@app.command()
def val(data: Annotated[Path, typer.Argument(
            help="A labelled image set: class folders named by ImageNet synset (n01440764/...) or class index, or a "
                 "CSV of path,label rows.")],
        model: Annotated[List[str], typer.Option(
            "--model", "-m", help=MODEL_HELP + " Or an artifact folder (repeatable: one pass over the images for all; "
                                               "artifacts are shown beside their source checkpoint).")
        ] = ["levit_128s"],
        init: InitOpt = "pretrained",
        limit: Annotated[Optional[int], typer.Option(
            help="Evaluate only the first N images (in sorted order).")] = None,
        batch: DecodeBatchOpt = 32,
        threads: ThreadsOpt = None,
        max_pixels: MaxPixelsOpt = 64_000_000,
        as_json: JsonOpt = False):
    """Top-1 / top-5 accuracy on your labelled images, each model beside its reference checkpoint."""
    quiet_exporters()
    samples = run_guarded(as_json, read_dataset, data, limit)
    status(f"{len(samples)} labelled images in {data}; opening {len(model)} model(s) …")
    contenders, references = run_guarded(as_json, contenders_for, model, init, threads)
    with Progress() as progress:
        report = run_guarded(as_json, evaluate, samples, contenders, references, batch, max_pixels, str(data),
                             progress)
    for bad in report.failed:
        print(f"error: {bad['error']}", file=sys.stderr)
    if report.evaluated == 0:
        fail(f"{data}: none of the {report.images} images could be read", as_json)
    if as_json:
        print(json.dumps({"ok": not report.failed, **report.to_dict()}, indent=2))
    else:
        _print_val(report)
    if report.failed:
        raise typer.Exit(EXIT_FAILED)


def _print_val(report) -> None:
    """Accuracy beside the reference's, and how many predictions differ from it."""
    rows = [("model", "runtime", "prec", "top-1", "top-5", "ref top-1", "ref top-5", "differ from ref")]
    for r in report.results:
        differ = "(is the reference)" if r.is_reference else f"{r.differ}/{r.n} ({r.differ / max(r.n, 1):.1%})"
        rows.append((r.name, r.runtime, r.precision, f"{r.top1:.2%}", f"{r.top5:.2%}", f"{r.reference_top1:.2%}",
                     f"{r.reference_top5:.2%}", differ))
    print(text_table(rows, right=(3, 4, 5, 6)))
    print(f"{report.evaluated} images evaluated, {len(report.failed)} could not be read")


arm64_app = typer.Typer(help="ARM64 (Graviton): prepare the emulated aarch64 environment used on x86-64 hosts.")
app.add_typer(arm64_app, name="arm64")


@arm64_app.command("setup")
def arm64_setup(force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
                as_json: JsonOpt = False):
    """Build, once, a cached aarch64 Python with numpy and onnxruntime, run through qemu-aarch64-static."""
    ready = run_guarded(as_json, Emulator().setup, status, force)
    if as_json:
        print(json.dumps({"ok": True, **ready}, indent=2))
    else:
        print(f"ready: {ready['python']} (aarch64) with numpy {ready['numpy']} and onnxruntime {ready['onnxruntime']}, "
              f"{ready['qemu']}, in {ready['sysroot']}")


@app.command("serve")
def serve_http(model: Annotated[str, typer.Argument(
                   help="An artifact folder, or a model (exported once into the cache).")],
               replicas: Annotated[int, typer.Option(help="Serving replicas (one CPU and one runtime each).")] = 1,
               max_batch: Annotated[int, typer.Option(
                   help="Largest batch a replica infers at once (serve.batch).")] = 16,
               batch_wait_ms: Annotated[float, typer.Option(help="How long a replica waits to fill a batch.")] = 10.0,
               port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
               host: Annotated[str, typer.Option(
                   help="Interface to listen on (0.0.0.0 for every one).")] = "127.0.0.1",
               topk: Annotated[int, typer.Option(help="Classes per answer.")] = 5,
               threads: Annotated[int, typer.Option(help="Runtime threads per replica.")] = 1,
               max_bytes: Annotated[int, typer.Option(help="Largest request body (413 above it).")] = 20 * 1024 * 1024,
               body_timeout: Annotated[float, typer.Option(
                   help="Seconds a request body may take (408 after them).")] = 10.0,
               max_queued: Annotated[int, typer.Option(
                   help="Requests waiting beyond the replicas' 4*max-batch (503 above it; -1: no limit).")] = 128,
               address: Annotated[Optional[str], typer.Option(
                   help="A Ray cluster to join [default: a local Ray].")] = None,
               weights: WeightsOpt = None,
               init: InitOpt = "pretrained",
               runtime: Annotated[Optional[str], typer.Option(
                   help="Runtime of the export, for a model that is not an artifact [default: the first that can "
                        "run here].")] = None,
               as_json: JsonOpt = False):
    """Serve top-k classification over HTTP on Ray Serve: POST image bytes to /, GET /healthz. Ctrl-C stops."""
    quiet_exporters()
    folder = run_guarded(as_json, artifact_folder, model, weights, init, runtime)
    url = run_guarded(as_json, start, folder, host, port, replicas, max_batch, batch_wait_ms, topk, threads, max_bytes,
                      address, body_timeout, max_queued)
    if as_json:
        print(json.dumps({"ok": True, "url": url, "artifact": str(folder)}), flush=True)
    else:
        print(f"serving {folder} at {url}  (curl --data-binary @image.jpg {url}; GET {url}healthz; Ctrl-C stops)",
              flush=True)
    run_until_interrupted(address)


@app.command()
def triton(artifact: Annotated[Path, typer.Argument(
               help="An artifact folder (onnx, openvino or tensorrt) with its manifest.")],
           repo: Annotated[Path, typer.Option(
               help="The Triton model repository to add it to (created if missing).")],
           name: Annotated[Optional[str], typer.Option(
               help="Model name in the repository [default: VARIANT_FORMAT].")] = None,
           max_batch: Annotated[int, typer.Option(help="max_batch_size of a dynamic-batch artifact.")] = 32,
           preferred_batch: Annotated[List[int], typer.Option(
               help="dynamic_batching preferred sizes (repeatable).")] = [8, 16],
           delay_us: Annotated[int, typer.Option(help="max_queue_delay_microseconds of the dynamic batcher.")] = 2000,
           instances: Annotated[int, typer.Option(help="instance_group count.")] = 1,
           threads: Annotated[int, typer.Option(help="OpenVINO: INFERENCE_NUM_THREADS per instance.")] = 1,
           as_json: JsonOpt = False):
    """Write repo/NAME/config.pbtxt, repo/NAME/1/<model file> and labels.txt for Triton Inference Server; the
    config is parsed with Triton's own schema (tritonclient) when it is installed."""
    options = TritonOptions(name, max_batch, tuple(preferred_batch), delay_us, instances, threads)
    folder = run_guarded(as_json, write_repository, artifact, repo, options)
    text = (folder / "config.pbtxt").read_text()
    checked = validate_config(text) is not None
    if as_json:
        print(json.dumps({"ok": True, "model": str(folder), "config": text, "schema_checked": checked}))
        return
    print(_field("model", folder))
    print(_field("config", folder / "config.pbtxt") + (" (parsed with Triton's ModelConfig schema)" if checked else
                                                       " (not schema-checked: pip install 'levit-deploy[triton]')"))
    print(_field("serve with", f"docker run --rm -p8000:8000 -p8001:8001 -v {folder.parent.resolve()}:/models "
                               f"nvcr.io/nvidia/tritonserver:<yy.mm>-py3 tritonserver --model-repository=/models"))


@app.command("backends")
def list_backends(as_json: JsonOpt = False):
    """The export targets and runtimes this levit-deploy knows, and which of them can run here."""
    rows = [{"target": b.name if b.write else None, "runtime": b.runtime, "installed": b.installed(),
             "usable_here": b.usable(), "needs": b.needs, "extra": b.extra, "export_precisions": list(b.precisions),
             "compute_precisions": list(b.compute_precisions), "options": b.option_help(),
             "description": b.description} for b in backends().values()]
    if as_json:
        print(json.dumps({"ok": True, "backends": rows}, indent=2))
        return
    table = [("target", "runtime", "here", "precisions", "install")]
    for r in rows:
        here = "yes" if r["usable_here"] else f"installed, needs {r['needs']}" if r["installed"] else "not installed"
        table.append((r["target"] or "-", r["runtime"], here, ", ".join(r["export_precisions"]) or "-",
                      f"levit-deploy[{r['extra']}]" if r["extra"] else "core"))
    print(text_table(table))
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
