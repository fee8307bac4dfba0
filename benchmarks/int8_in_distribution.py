"""int8 on in-distribution checkpoints: does each backend's int8 artifact pass its gate, how many layers the remedy
keeps in float, and how fast it runs against our fp32 artifact of the same backend (1 thread, batch 16).

    .venv/bin/python benchmarks/int8_in_distribution.py --work /tmp/int8-id [--fixtures] [--only NAME] \
        [--backends openvino,onnx,executorch]

Each case: ``levit-deploy export CKPT --to X --out fp32`` then ``--precision int8 --calib C --images I --json``
(exit 0: passed, 1: refused), then ``levit-deploy bench fp32 int8 --duration 3``. Every result is appended as
one JSON line to ``WORK/results.jsonl`` (a case already there is skipped, so the script resumes), and
``--table`` prints the markdown table of benchmarks/results/int8_in_distribution.md from it.

Checkpoints: the shared yardstick ``../shared/checkpoints/in_distribution/levit_128s_in_distribution.pth`` (with
its calib/ and images/), and with ``--fixtures`` the in-distribution fixtures of tests/in_distribution.py
(levit_256, lightvit_tiny, litv2_s, levit_128s), built into WORK.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "levit-deploy")
SHARED = ROOT.parent / "shared" / "checkpoints" / "in_distribution"
BACKENDS = ("openvino", "onnx", "executorch")
FIXTURES = ("levit_256", "lightvit_tiny", "litv2_s", "levit_128s")
TIMEOUT = 480  # seconds per export by default (--timeout): a case past it is recorded as timed out
BENCH_TIMEOUT = 1500  # seconds for the bench of one case: LITv2-S needs more than 10 minutes for its fp64 reference and cold starts


def cases(work: Path, fixtures: bool, retina: bool = False, synthetic: bool = False, only: str = ""
          ) -> list[tuple[str, str, Path, Path, Path]]:
    """(name, folder tag, checkpoint, calib folder, images folder); a fixture is built only when ``only`` (a prefix
    of case names) can select it (LITv2-S takes minutes). ``retina``: each fixture also calibrated on its
    calib/ plus 8 crops of the bundled retina.jpg (the gate photo its int8 clips: the remedy the refusal names);
    ``synthetic``: and on those plus 8 procedural JPEGs of other seeds than the gate's (the other inputs it names)."""
    out = [("levit_128s (shared yardstick)", "yardstick", SHARED / "levit_128s_in_distribution.pth", SHARED / "calib",
            SHARED / "images")]
    if fixtures:
        sys.path.insert(0, str(ROOT / "tests"))
        import torch
        torch.set_num_threads(1)
        from in_distribution import calib_and_judge_folders, in_distribution_file

        calib, images = calib_and_judge_folders(work / "photos")
        with_retina = _with_retina_crops(calib, work / "photos" / "calib+retina") if retina or synthetic else None
        with_synthetic = _with_synthetic(with_retina, work / "photos" / "calib+retina+synthetic") if synthetic else None
        for variant in (v for v in FIXTURES if v.startswith(only) or only.startswith(v)):
            ckpt = in_distribution_file(variant, work / "checkpoints")
            out.append((f"{variant} (fixture seed 0)", variant, ckpt, calib, images))
            if retina:
                out.append((f"{variant} (fixture seed 0, calib + 8 retina crops)", f"{variant}+retina", ckpt,
                            with_retina, images))
            if synthetic:
                out.append((f"{variant} (fixture seed 0, calib + 8 retina crops + 8 synthetic JPEGs)",
                            f"{variant}+retina+synthetic", ckpt, with_synthetic, images))
    return out


def _with_synthetic(calib: Path, folder: Path) -> Path:
    """``calib``'s images and 8 procedural JPEGs (seeds 100-107; the gate's are seed 0, the stand-in's seed 1)."""
    from levit_deploy.preprocess import synthetic_jpegs

    if not folder.is_dir():
        shutil.copytree(calib, folder)
        for seed in range(100, 108):
            (folder / f"synthetic-{seed}.jpg").write_bytes(synthetic_jpegs(1, seed)[0])
    return folder


def _with_retina_crops(calib: Path, folder: Path) -> Path:
    """``calib``'s images and 8 random crops of scikit-image's retina photo (the bundled gate photo's source)."""
    from real_photos import photo_crops, write_images

    if not folder.is_dir():
        shutil.copytree(calib, folder)
        write_images(folder, photo_crops(["retina"], 8, seed=21))
    return folder


def run(cmd: list[str], timeout: float) -> tuple[int | None, str, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        return None, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or ""), time.perf_counter() - t0


def _json(text: str):
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return None
    start = min(starts)
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None


def gate_summary(doc: dict | None) -> dict:
    """passed, layers kept/quantized, worst gating cosine (all, and per kind), top-1 agreement from an export's
    --json output (a refused export's carries its last attempt's parity report; the notes say what was tried)."""
    if doc is None:
        return {}
    parity = doc["manifest"]["parity"] if doc.get("ok") else doc.get("parity") or {}
    per = [r for r in parity.get("per_input", []) if r.get("gating")]
    by_kind: dict[str, float] = {}
    for r in per:
        by_kind[r["kind"]] = min(by_kind.get(r["kind"], 1.0), r["cosine"])
    out = {"passed": bool(doc.get("ok")), "worst_cosine": min((r["cosine"] for r in per), default=None),
           "worst_cosine_by_kind": by_kind, "top1_agreement": parity.get("top1_agreement"),
           "min_cosine_all": parity.get("min_cosine"), "failed_gating": sum(1 for r in per if not r["passed"]),
           "failed_by_kind": {k: sum(1 for r in per if r["kind"] == k and not r["passed"]) for k in by_kind},
           "gating_inputs": len(per), "notes": parity.get("notes", []),
           "error": None if doc.get("ok") else doc.get("error")}
    if doc.get("ok"):
        recipe = doc["manifest"]["export"]["calibration"].get("recipe", {})
        out.update(kept=len(recipe.get("keep_float", [])), quantized=recipe.get("quantized_layers"),
                   keep_float=recipe.get("keep_float", []),
                   attempts=[len(a["keep_float"]) for a in recipe.get("attempts", [])])
    else:
        for note in out["notes"]:
            m = re.match(r"kept ([\d, ]+) of (\d+) quantized layers in float", note)
            if m:
                tried = [int(t) for t in m.group(1).split(",")]
                out.update(kept=tried[-1], quantized=int(m.group(2)), attempts=tried)
    return out


def refresh(rec: dict, work: Path) -> dict:
    """Re-derive a record's gate summary from the files its int8 export left (manifest or parity-failed report)."""
    folder = work / f"{rec.get('tag', rec['case'].split()[0])}-{rec['backend']}-int8"
    failed = folder / f"parity-failed-{rec['backend']}.json"
    if (folder / "manifest.json").exists() and rec["int8_export"].get("rc") == 0:
        doc = {"ok": True, "manifest": json.loads((folder / "manifest.json").read_text())}
    elif failed.exists() and rec["int8_export"].get("rc") == 1:
        doc = {"ok": False, "parity": json.loads(failed.read_text()), "error": rec["int8_export"].get("error")}
    else:
        return rec
    rec["int8_export"].update(gate_summary(doc))
    return rec


def bench(fp32: Path, int8: Path, duration: float, images: str) -> dict:
    """Both artifacts in one bench run, judged on the images their export was gated on."""
    cmd = [CLI, "bench", str(fp32), str(int8), "--images", images, "--duration", str(duration), "--warmup", "1",
           "--json"]
    rc, out, err, secs = run(cmd, BENCH_TIMEOUT)
    doc = _json(out)
    return {"cmd": " ".join(cmd), "rc": rc, "raw": doc, "stdout": out if doc is None else "",
            "stderr_tail": err[-1500:], "seconds": round(secs, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/int8-in-distribution"))
    ap.add_argument("--fixtures", action="store_true", help="also the fixtures of tests/in_distribution.py")
    ap.add_argument("--retina", action="store_true",
                    help="with --fixtures: also each fixture calibrated on calib/ plus 8 crops of retina.jpg")
    ap.add_argument("--synthetic", action="store_true",
                    help="with --fixtures: also calib/ plus 8 retina crops and 8 synthetic JPEGs of other seeds")
    ap.add_argument("--only", default="", help="run only the cases whose name starts with this")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per export")
    ap.add_argument("--rebench", action="store_true", help="bench again the passed cases with no throughput")
    ap.add_argument("--table", action="store_true", help="print the markdown table from WORK/results.jsonl")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = args.work / "results.jsonl"
    done = {}
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            done[r["case"], r["backend"]] = r
    if args.table:
        print(table([refresh(r, args.work) for r in done.values()]))
        return
    if args.rebench:
        for rec in done.values():
            if rec["int8_export"].get("rc") == 0 and None in _throughputs((rec.get("bench") or {}).get("raw")):
                tag = f"{rec.get('tag', rec['case'].split()[0])}-{rec['backend']}"
                rec["bench"] = bench(args.work / f"{tag}-fp32", args.work / f"{tag}-int8", args.duration,
                                     rec["images"])
                print(f"{tag}: fp32, int8 img/s = {_throughputs(rec['bench']['raw'])}", file=sys.stderr, flush=True)
        results.write_text("".join(json.dumps(r, default=str) + "\n" for r in done.values()))
        return
    for name, case_tag, ckpt, calib, images in cases(args.work, args.fixtures, args.retina, args.synthetic, args.only):
        if not name.startswith(args.only):
            continue
        for backend in args.backends.split(","):
            if (name, backend) in done:
                continue
            tag = f"{case_tag}-{backend}"
            fp32_dir, int8_dir = args.work / f"{tag}-fp32", args.work / f"{tag}-int8"
            rec = {"case": name, "tag": case_tag, "backend": backend, "checkpoint": str(ckpt), "calib": str(calib),
                   "images": str(images)}
            fp32_cmd = [CLI, "export", str(ckpt), "--to", backend, "--out", str(fp32_dir), "--json"]
            int8_cmd = [CLI, "export", str(ckpt), "--to", backend, "--precision", "int8", "--calib", str(calib),
                        "--images", str(images), "--out", str(int8_dir), "--json"]
            rec["commands"] = [" ".join(fp32_cmd), " ".join(int8_cmd)]
            print(f"[{time.strftime('%H:%M:%S')}] {name} {backend}: fp32 export", file=sys.stderr, flush=True)
            rc, out, err, secs = run(fp32_cmd, args.timeout)
            rec["fp32_export"] = {"rc": rc, "seconds": round(secs, 1), "stderr_tail": err[-800:] if rc else ""}
            print(f"[{time.strftime('%H:%M:%S')}] {name} {backend}: int8 export", file=sys.stderr, flush=True)
            rc, out, err, secs = run(int8_cmd, args.timeout)
            rec["int8_export"] = {"rc": rc, "seconds": round(secs, 1), "timed_out": rc is None,
                                  "stderr_tail": err[-2500:], **gate_summary(_json(out))}
            if rec["fp32_export"]["rc"] == 0 and rc == 0:
                print(f"[{time.strftime('%H:%M:%S')}] {name} {backend}: bench", file=sys.stderr, flush=True)
                rec["bench"] = bench(fp32_dir, int8_dir, args.duration, str(images))
            with results.open("a") as f:
                f.write(json.dumps(rec, default=str) + "\n")
            g = rec["int8_export"]
            print(f"  -> rc {rc} in {secs:.0f}s passed={g.get('passed')} kept={g.get('kept')}/{g.get('quantized')} "
                  f"worst cos={g.get('worst_cosine')} top1={g.get('top1_agreement')}", file=sys.stderr, flush=True)


def _throughputs(bench_doc) -> tuple[float | None, float | None]:
    """(fp32 img/s, int8 img/s) of the two artifact folders from `levit-deploy bench --json` (one document each;
    each also times the torch and plain-export baselines, left out here)."""
    if not bench_doc:
        return None, None
    found = {}
    for doc in bench_doc if isinstance(bench_doc, list) else [bench_doc]:
        for r in doc.get("results", []):
            if r.get("images_per_s") and r.get("label", "").startswith("artifact "):
                found.setdefault(r.get("precision"), r["images_per_s"])
    return found.get("fp32"), found.get("int8")


def table(records) -> str:
    lines = ["| checkpoint | backend | int8 passed | kept in float / quantized | worst gating cosine | top-1 agreement "
             "| worst cosine, user images (failed) | int8 img/s | fp32 img/s | int8 / fp32 | int8 export s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        g = r["int8_export"]
        if g.get("timed_out"):
            verdict = f"timed out (> {g['seconds']:.0f} s)"
        elif g.get("rc") not in (0, 1):
            verdict = f"error (exit {g.get('rc')})"
        else:
            verdict = "yes" if g["passed"] else "no (refused)"
        kept = f"{g['kept']} / {g['quantized']}" if g.get("quantized") else "—"
        cos = f"{g['worst_cosine']:.4f}" if g.get("worst_cosine") is not None else "—"
        top1 = f"{g['top1_agreement']:.0%}" if g.get("top1_agreement") is not None else "—"
        user = g.get("worst_cosine_by_kind", {}).get("user images")
        user = f"{user:.4f} ({g['failed_by_kind'].get('user images', 0)})" if user is not None else "—"
        fp32, int8 = _throughputs((r.get("bench") or {}).get("raw"))
        ratio = f"{int8 / fp32:.2f}×" if fp32 and int8 else "—"
        lines.append(f"| {r['case']} | {r['backend']} | {verdict} | {kept} | {cos} | {top1} | "
                     f"{user} | {int8 and f'{int8:.1f}' or '—'} | {fp32 and f'{fp32:.1f}' or '—'} | {ratio} | "
                     f"{g.get('seconds', '—')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
