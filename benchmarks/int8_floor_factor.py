"""How large the int8 rule's K must be (parity.INT8_FLOOR_FACTOR): per gating input, an int8 artifact's cosine loss
over the original model's own worst bf16 loss on that input, where that floor decides the bound.

    .venv/bin/python benchmarks/int8_floor_factor.py WORK [--faults ORT_INT8_DIR --images DIR] [--json OUT]

The int8 rule passes input i when 1 - cos_i <= max(0.01, K·(1 - bf16cos_i)). On an input the model computes stably
(1 - bf16cos_i <= 0.01 / K) the absolute 0.01 decides and K does not matter; on the others the ratio
r_i = (1 - cos_i) / (1 - bf16cos_i) is what K bounds. WORK holds int8 exports (`*-int8` folders of
benchmarks/int8_in_distribution.py): a passed one's manifest carries its gate report, a refused one's
parity-failed report the search's last attempt. For each, the table gives the smallest K its cosines pass under
(the largest r among the inputs that lose more than 0.01, and which input), and how many gating inputs fail the
cosine bound at K = 2, 4, 8 and 16 (top-1 agreement, the rule's other half, is left out).

``--faults ORT_INT8_DIR``: also the two faults the rule must refuse (tests/int8_faults.py), built from a passed ONNX
Runtime int8 artifact: one activation's dequantization scale doubled (judged by `levit-deploy parity`), and the
same checkpoint calibrated on 20 blank images with no layer kept in float (`levit-deploy export`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "levit-deploy")
sys.path.insert(0, str(ROOT / "tests"))
from int8_faults import double_one_activation_scale, write_blank_images  # noqa: E402

FACTORS = (2, 4, 8, 16)
ABSOLUTE = 0.01  # the rule's slack on inputs the model computes stably


def gate_report(folder: Path) -> tuple[str, dict] | None:
    """("passed", the manifest's gate report) or ("refused", the parity-failed report), or None."""
    if (folder / "manifest.json").exists():
        return "passed", json.loads((folder / "manifest.json").read_text())["parity"]
    failed = sorted(folder.glob("parity-failed-*.json"))
    return ("refused", json.loads(failed[0].read_text())) if failed else None


def ratios(report: dict) -> dict:
    """Over the gating inputs: the smallest K under which every input's cosine passes (an input within the absolute
    0.01 needs none), on which input, how many inputs lose more than 0.01 (only K can pass those), and the
    cosine failures at each K of FACTORS."""
    gating = [r for r in report["per_input"] if r["gating"]]
    needs = [(r["name"].rsplit("/", 1)[-1], (1 - r["cosine"]) / (1 - r["floor_cosine"])) for r in gating
             if 1 - r["cosine"] > ABSOLUTE]
    fails = {k: sum(1 for r in gating if 1 - r["cosine"] > max(ABSOLUTE, k * (1 - r["floor_cosine"])))
             for k in FACTORS}
    worst = max(needs, key=lambda d: d[1], default=(None, None))
    return {"inputs": len(gating), "beyond_absolute": len(needs), "k_needed": worst[1], "k_needed_input": worst[0],
            "fails": fails}


def fault_reports(int8_dir: Path, images: Path, work: Path) -> dict[str, dict]:
    """The gate reports of the two faults (tests/int8_faults.py) built from ``int8_dir``."""
    broken = shutil.copytree(int8_dir, work / "doubled-scale")
    double_one_activation_scale(broken)
    out = subprocess.run([CLI, "parity", str(broken), "--images", str(images), "--json"], capture_output=True,
                         text=True)
    if out.returncode not in (0, 1):
        raise SystemExit(f"parity of the doubled-scale copy failed (exit {out.returncode}): {out.stderr[-300:]}")
    doubled = json.loads(out.stdout)["chain"][-1]
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    blank = write_blank_images(work / "blank")
    target = work / "blank-calibrated"
    out = subprocess.run([CLI, "export", manifest["source"]["source"], "--to", "onnx", "--precision", "int8",
                          "--calib", str(blank), "--images", str(images), "-o", "max_float_fraction=0", "--out",
                          str(target)], capture_output=True, text=True)
    judged = gate_report(target)
    if judged is None:
        raise SystemExit(f"the blank-calibrated export left no gate report (exit {out.returncode}): "
                         f"{out.stderr[-300:]}")
    return {"doubled activation scale": doubled, "calibrated on blank images": judged[1]}


def row(name: str, verdict: str, r: dict) -> str:
    needed = f"{r['k_needed']:.2f} ({r['k_needed_input']})" if r["k_needed"] is not None else "— (none)"
    return (f"| {name} | {verdict} | {r['inputs']} | {r['beyond_absolute']} | {needed} | "
            + " | ".join(str(r["fails"][k]) for k in FACTORS) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, help="a folder of int8 exports (`*-int8` folders)")
    ap.add_argument("--faults", type=Path, help="a passed ONNX Runtime int8 artifact to build the two faults from")
    ap.add_argument("--images", type=Path, help="with --faults: the images that artifact was gated on")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    lines = ["| int8 artifact | gate | gating inputs | inputs with 1 − cos > 0.01 | K needed: largest (1 − cos) / "
             "(1 − bf16 cos) among them (input) | "
             + " | ".join(f"fail at K={k}" for k in FACTORS) + " |", "|---|---|---|---|---|" + "---|" * len(FACTORS)]
    found = {}
    for folder in sorted(args.work.glob("*-int8")):
        got = gate_report(folder)
        if got:
            found[folder.name] = (got[0], ratios(got[1]))
    if args.faults:
        if not (args.faults / "manifest.json").is_file() or args.images is None:
            raise SystemExit(f"--faults takes a passed ONNX Runtime int8 artifact folder and --images the folder it "
                             f"was gated on; {args.faults} has no manifest.json")
        with tempfile.TemporaryDirectory() as scratch:
            for name, report in fault_reports(args.faults, args.images, Path(scratch)).items():
                found[f"fault: {name}"] = ("refused" if not report["passed"] else "passed", ratios(report))
    lines += [row(name, verdict, r) for name, (verdict, r) in found.items()]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({name: {"gate": v, **r} for name, (v, r) in found.items()}, indent=2))


if __name__ == "__main__":
    main()
