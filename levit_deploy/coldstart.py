"""Cold start and peak memory of one bench case, each measured in a fresh process.

A case measured inside the bench process would inherit every other case's memory and warm caches, so each
one is opened again in a child: the child imports levit-deploy, then opens the case (an artifact, or the
model built from its checkpoint) and runs one batch, and reports how long the open and the first inference
took and its own peak resident memory (VmHWM, read by the child: the parent's getrusage/wait4 would count
the forking process's memory too, since Linux keeps the high-water mark across exec).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from .backends import open_runtime
from .checkpoints import load
from .fuse import fuse
from .reference import random_inputs


@dataclass
class ColdStart:
    open_ms: float  # artifact read and runtime compiled (or checkpoint loaded and model built)
    first_ms: float  # the first inference on one batch
    cold_start_ms: float  # the two together: what a fresh process waits before its first answer
    peak_rss_mb: float  # the child's peak resident memory, interpreter and libraries included
    base_rss_mb: float  # its resident memory after the imports, before the case was opened

    def to_dict(self) -> dict:
        return asdict(self)


def measure(spec: dict, timeout: float = 900.0) -> ColdStart:
    """Run ``spec`` (see ``_open``) in a fresh interpreter; raises RuntimeError with the child's last line."""
    proc = subprocess.run([sys.executable, "-m", __name__, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"cold-start probe exited {proc.returncode}: {tail}")
    return ColdStart(**json.loads(lines[-1]))


def _open(spec: dict):
    """A Runtime for ``spec``: {"artifact": path} or {"model": target, "weights", "init", "entry", "fused"},
    with "device", "threads" and optional "compute"."""
    options = {"compute": spec["compute"]} if spec.get("compute") else {}
    if "artifact" in spec:
        return open_runtime(spec["artifact"], None, spec["device"], spec["threads"], **options)
    model = load(spec["model"], weights=spec.get("weights"), init=spec.get("init", "pretrained"),
                 entry=spec.get("entry"))
    if spec.get("fused"):
        model = fuse(model, check=False)
    return open_runtime(model, None, spec["device"], spec["threads"], **options)


def _memory_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _main(spec: dict) -> None:
    batch = random_inputs(spec["batch"], seed=1, size=spec["img_size"])
    base = _memory_mb("VmRSS")
    t0 = time.perf_counter()
    runtime = _open(spec).activate()
    t1 = time.perf_counter()
    runtime.infer(batch)
    t2 = time.perf_counter()
    runtime.close()
    result = ColdStart((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, _memory_mb("VmHWM"), base)
    print(json.dumps(result.to_dict()))


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]))
