"""ARM64 (Graviton) inference: native presets on aarch64, emulated parity anywhere else.

Native: the artifact runs in a subprocess (so environment presets take effect before the runtime
initialises) with the settings AWS recommends for Graviton, each a named option recorded in the
report: one thread; ONNX Runtime's bf16 fast-math GEMM opt-in; for PyTorch
DNNL_DEFAULT_FPMATH_MODE=BF16 opt-in, LRU_CACHE_CAPACITY=1024 and THP_MEM_ALLOC_ENABLE=1.

Emulated (x86-64 hosts): ``levit-deploy arm64 setup`` builds, once, an aarch64 Python from Debian's
arm64 packages plus the aarch64 wheels of numpy and onnxruntime, and runs it with
``qemu-aarch64-static -L <sysroot>``. Emulation checks parity of the very code users run on ARM; its
timings mean nothing, so none are taken.
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .checkpoints import resolve
from .env import cache_dir, cpu_info
from .export import cached_export
from .fuse import fuse
from .parity import judge
from .reference import build_reference_set

# Emulation pins onnxruntime: the 1.31.1 aarch64 wheel dies with SIGSEGV at import under Debian 12's
# qemu-user 7.2 (seen here), while 1.24.4 imports and runs our artifacts (1.20-1.24 are reported to run).
# Native aarch64 hosts use whatever onnxruntime is installed.
EMULATED_ORT = "onnxruntime==1.24.4"
EMULATED_NUMPY = "numpy==2.2.6"
PYTHON = "python3.11"
DEBIAN_PACKAGES = ("python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libstdc++6",
                   "libgcc-s1", "zlib1g", "libexpat1", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libcrypt1",
                   "libuuid1", "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libdb5.3", "libgomp1")
AARCH64_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
                     "manylinux2014_aarch64")
ORT_FASTMATH = "mlas.enable_gemm_fastmath_arm64_bfloat16"
WORKER = Path(__file__).with_name("arm64_worker.py")


class Arm64Error(RuntimeError):
    """The arm64 path cannot run here; the message says what to install or run."""


def is_native() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


@dataclass
class Presets:
    """The Graviton settings, each named as users would set it by hand, and recorded."""

    threads: int = 1
    bf16_fast_math: bool = False
    runtime: str = "ort"

    def session_config(self) -> dict[str, str]:
        return {ORT_FASTMATH: "1"} if self.bf16_fast_math and self.runtime == "ort" else {}

    def environment(self) -> dict[str, str]:
        env = {"OMP_NUM_THREADS": str(self.threads)}
        if self.runtime == "torch":
            env.update({"LRU_CACHE_CAPACITY": "1024", "THP_MEM_ALLOC_ENABLE": "1"})
            if self.bf16_fast_math:
                env["DNNL_DEFAULT_FPMATH_MODE"] = "BF16"
        return env

    @property
    def parity_precision(self) -> str:
        """bf16 fast-math changes fp32 results by design, so parity uses the bf16 tolerance then."""
        return "bf16" if self.bf16_fast_math else "fp32"

    def to_dict(self) -> dict:
        return {**asdict(self), "session_config": self.session_config(), "environment": self.environment(),
                "parity_precision": self.parity_precision}


@dataclass
class Emulator:
    """A cached aarch64 Python with numpy and onnxruntime, run through qemu-user."""

    root: Path = field(default_factory=lambda: cache_dir() / "arm64")

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site(self) -> Path:
        return self.root / "site-packages"

    @property
    def stamp(self) -> Path:
        return self.root / "setup.json"

    def qemu(self) -> str:
        path = shutil.which("qemu-aarch64-static")
        if not path:
            raise Arm64Error("qemu-aarch64-static not found: install Debian's qemu-user-static "
                             "(apt-get install qemu-user-static)")
        return path

    def ready(self) -> bool:
        return self.stamp.is_file()

    def command(self, *args: str) -> list[str]:
        return [self.qemu(), "-L", str(self.sysroot), str(self.sysroot / "usr" / "bin" / PYTHON), *args]

    def env(self) -> dict[str, str]:
        return {"PYTHONPATH": str(self.site), "PYTHONNOUSERSITE": "1", "PATH": "/usr/bin:/bin"}

    def setup(self, status: Callable[[str], None] = print, force: bool = False) -> dict:
        """Download and unpack the aarch64 sysroot and wheels once; returns what was installed."""
        self.qemu()
        if self.ready() and not force:
            return json.loads(self.stamp.read_text())
        if not shutil.which("apt-get") or not shutil.which("dpkg"):
            raise Arm64Error("arm64 setup needs apt-get and dpkg (a Debian or Ubuntu host) to fetch Debian's "
                             "arm64 packages")
        self.root.mkdir(parents=True, exist_ok=True)
        for child in self.root.iterdir():  # empty it (the root itself may be a link to a shared folder)
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        work = self.root / "download"
        lists, cache, debs, wheels = work / "lists", work / "cache", work / "debs", work / "wheels"
        for d in (lists / "partial", cache / "archives" / "partial", debs, wheels, self.sysroot, self.site):
            d.mkdir(parents=True, exist_ok=True)
        apt = ["apt-get", "-q", "-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
               "-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache}"]
        status("arm64 setup: reading Debian's arm64 package lists …")
        _run([*apt, "update"])
        status(f"arm64 setup: downloading {len(DEBIAN_PACKAGES)} Debian arm64 packages …")
        _run([*apt, "download", *DEBIAN_PACKAGES], cwd=debs)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(self.sysroot)])
        status(f"arm64 setup: downloading aarch64 wheels ({EMULATED_NUMPY}, {EMULATED_ORT}) …")
        platforms = [arg for p in AARCH64_PLATFORMS for arg in ("--platform", p)]
        _run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps", "--python-version",
              "3.11", "--implementation", "cp", *platforms, "-d", str(wheels), EMULATED_NUMPY, EMULATED_ORT])
        for wheel in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(self.site)
        shutil.rmtree(work)
        status("arm64 setup: checking the emulated interpreter …")
        probe = _run(self.command("-c", "import numpy, onnxruntime, platform, json; print(json.dumps("
                                  "[platform.machine(), numpy.__version__, onnxruntime.__version__]))"),
                     env=self.env())
        machine, np_version, ort_version = json.loads(probe.stdout.strip().splitlines()[-1])
        if machine != "aarch64":
            raise Arm64Error(f"the emulated interpreter reports {machine!r}, expected aarch64")
        info = {"python": PYTHON, "numpy": np_version, "onnxruntime": ort_version, "sysroot": str(self.sysroot),
                "qemu": subprocess.run([self.qemu(), "--version"], capture_output=True, text=True).stdout.splitlines()[0]}
        self.stamp.write_text(json.dumps(info, indent=2))
        return info


def _run(cmd: list[str], cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise Arm64Error(f"{' '.join(cmd[:3])} … failed (exit {done.returncode}): {' | '.join(tail)}")
    return done


def run_worker(model_file: Path, inputs: np.ndarray, presets: Presets, emulator: Emulator | None,
               duration: float = 0.0, batch: int = 16) -> tuple[np.ndarray, dict]:
    """Run the worker natively (emulator None) or under qemu; returns (logits, its report)."""
    import os

    with tempfile.TemporaryDirectory(prefix="levit-arm64-") as tmp:
        np.save(Path(tmp) / "inputs.npy", inputs)
        args = [str(WORKER), str(model_file), str(Path(tmp) / "inputs.npy"), str(Path(tmp) / "out.npz"),
                "--threads", str(presets.threads), "--batch", str(batch), "--duration", str(duration)]
        for key, value in presets.session_config().items():
            args += ["--config", f"{key}={value}"]
        if emulator is None:
            cmd, env = [sys.executable, *args], {**os.environ, **presets.environment()}
        else:
            cmd, env = emulator.command(*args), {**emulator.env(), **presets.environment()}
        done = _run(cmd, env=env)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        logits = np.load(Path(tmp) / "out.npz")["logits"]
    return logits, report


def _torch_program(model, folder: Path) -> Path:
    """The fused model as a torch.export program for the native torch worker."""
    path = folder / "model.pt2"
    if not path.exists():
        size = model.config.img_size
        program = torch.export.export(fuse(model), (torch.randn(2, 3, size, size),),
                                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}})
        torch.export.save(program, str(path))
    return path


def bench_arm64(targets: list[str], arch: str = "arm64", weights=None, init: str = "pretrained", threads: int = 1,
                batch: int = 16, duration: float = 10.0, fast_math: bool = False, runtimes=("ort",),
                status: Callable[[str], None] = print, images=(), entry: str | None = None) -> dict:
    """Parity (and, natively, timing) on aarch64 for each target (any family); one document.

    One reference set per model serves the export (when the cache has no artifact yet) and the
    aarch64 comparison alike.
    """
    if arch not in ("arm64", "aarch64"):
        raise Arm64Error(f"--arch {arch!r} is not supported; the ARM target is arm64")
    unknown = set(runtimes) - {"ort", "torch"}
    if unknown:
        raise Arm64Error(f"--arch arm64 runs the ort runtime (and torch natively), not {', '.join(sorted(unknown))}")
    native = is_native()
    emulator = None
    if not native:
        if "torch" in runtimes:
            raise Arm64Error("--runtime torch --arch arm64 needs a native aarch64 host: there is no emulated PyTorch")
        emulator = Emulator()
        if not emulator.ready():
            status("no emulated arm64 environment yet: running `levit-deploy arm64 setup` …")
        emulator.setup(status)
    runs = []
    for target in targets:
        resolved = resolve(target, weights, init, entry)
        if resolved.artifact is not None and resolved.manifest["artifact"]["format"] != "onnx":
            raise Arm64Error(f"{target}: a {resolved.manifest['artifact']['format']} artifact; --arch arm64 runs "
                             f"ONNX artifacts in onnxruntime")
        model = resolved.model()
        reference = build_reference_set(model, images=images)
        folder = resolved.artifact
        if folder is None:
            status(f"{model.config.name}: exporting (or reusing the cached ONNX artifact) …")
            folder = cached_export(model, "onnx", reference=reference)
        for runtime in runtimes:
            presets = Presets(threads, fast_math, runtime)
            model_file = folder / "model.onnx" if runtime == "ort" else _torch_program(model, folder)
            mode = "native" if native else "emulated (qemu-user)"
            status(f"{model.config.name}: running on aarch64, {mode}, {runtime} …")
            logits, report = run_worker(model_file, reference.inputs, presets, emulator,
                                        duration if native else 0.0, batch)
            precision = presets.parity_precision
            parity = judge(reference, logits, precision, f"aarch64 {runtime}")
            cpu = report["cpu"]
            if not native:
                cpu["model"] = f"qemu-user aarch64 on {cpu_info()['model']}"
            runs.append({"model": model.config.name, "artifact": str(folder), "runtime": runtime,
                         "emulated": not native, "presets": presets.to_dict(), "cpu": cpu,
                         "versions": report["versions"], "parity": parity.to_dict(),
                         "timing": report["timing"] if native else None,
                         "timing_note": None if native else "emulated: timings are not measured (meaningless "
                                                            "under qemu); run natively on Graviton for speed"})
    return {"ok": all(r["parity"]["passed"] for r in runs), "arch": "arm64", "native": native, "runs": runs,
            "emulator": json.loads(emulator.stamp.read_text()) if emulator else None}


def format_arm64(doc: dict) -> str:
    mode = "native" if doc["native"] else f"emulated ({doc['emulator']['qemu']}, onnxruntime {doc['emulator']['onnxruntime']})"
    lines = [f"arm64, {mode}",
             f"{'model':11} {'runtime':7} {'prec':5} {'e/bound':>8} {'max e/s':>8} {'top-1':>6} {'parity':6} "
             f"{'img/s':>7} {'p50 ms':>7}  cpu / features"]
    for r in doc["runs"]:
        p, t = r["parity"], r["timing"]
        speed = f"{t['images_per_s']:7.1f} {t['p50_ms']:7.1f}" if t else f"{'—':>7} {'—':>7}"
        lines.append(f"{r['model']:11} {r['runtime']:7} {p['precision']:5} {p['worst_margin']:8.2g} "
                     f"{p['max_e_over_s']:8.1e} {p['top1_agreement']:6.0%} {'PASS' if p['passed'] else 'FAIL':6} "
                     f"{speed}  {r['cpu']['model']} [{', '.join(r['cpu']['features'])}]")
        kinds = ", ".join(f"{k['kind']} {k['n'] - k['failed']}/{k['n']} (e/s ≤ {k['max_e_over_s']:.1e}, floor/s ≤ "
                          f"{k['max_floor_over_s']:.1e}, tol/floor {k['decided_by_tolerance']}/{k['decided_by_floor']})"
                          for k in p["kinds"])
        lines.append(f"{'':11} inputs: {kinds}")
    if any(r["emulated"] for r in doc["runs"]):
        lines.append("emulated: true — parity is real (aarch64 code paths of onnxruntime), timings are not taken")
    return "\n".join(lines)
