"""Shared fixtures. Expensive things are built once per session: trained-like checkpoints, reference sets
and exported artifacts (copy an artifact before tampering with it). The levit-deploy cache is one fresh
folder per session, except for the ARM64 sysroot, which persists between runs (`tests/.cache`, or
$LEVIT_DEPLOY_TEST_CACHE); a test about caching itself takes the per-test ``fresh_cache``."""
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
#: one thread, however the suite runs: `make test` runs a worker per core, and the trained-like fixtures come out
#: the same in a worker, in a serial run and in a single test (their BatchNorm calibration depends on the thread count)
torch.set_num_threads(1)

from layouts_ref import hf_model, hf_state_dict, to_official, write_layout  # noqa: E402
from trained_like import make_trained_like_  # noqa: E402

SHARED_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "levit_128s_trained_like.pth"
IN_DISTRIBUTION = SHARED_CHECKPOINT.parent / "in_distribution"
PERSISTENT_CACHE = Path(os.environ.get("LEVIT_DEPLOY_TEST_CACHE", Path(__file__).parent / ".cache"))
FIXTURES: dict[str, Path] = {}  # "dir": the session's folder for checkpoint files (set by session_cache)


def trained_like_hf(variant: str, calibration: str = "smooth", seed: int = 0, num_classes: int = 1000,
                    distilled: bool = True):
    """A Hugging Face LeViT with random weights whose BatchNorm statistics come from ``calibration``
    images (see trained_like.py). Cached for the session: treat it as read-only.

    Built once per argument set, however it is called: the calibration forward is so sensitive that a
    rebuild under another thread count gives BatchNorm statistics whose model differs by 1e-3·s."""
    return _trained_like_hf(variant, calibration, seed, num_classes, distilled)


@lru_cache(maxsize=None)
def _trained_like_hf(variant, calibration, seed, num_classes, distilled):
    model = hf_model(variant, seed=seed, num_classes=num_classes, distilled=distilled)
    return make_trained_like_(model, calibration, n=32, seed=seed)


@lru_cache(maxsize=None)
def trained_like_state_dict(variant: str, seed: int = 0) -> dict:
    """A trained-like state dict of any family's variant, in its official key names. LeViT's comes from
    Hugging Face's independent implementation; the others from our reference model, randomised and with
    their BatchNorm statistics calibrated on smooth images (their independent implementations in the tests
    are plain functions of a state dict and check the loaded model instead)."""
    from levit_deploy.families import resolve_variant

    family, variant = resolve_variant(variant)
    if family.name == "levit":
        return hf_state_dict(trained_like_hf(variant, seed=seed))
    model = family.randomize_(family.create(family.config(variant)), seed)
    # 16 calibration images: these families have a handful of BatchNorms (LightViT's stem, LITv2's DTMs)
    return {k: v.clone() for k, v in make_trained_like_(model, "smooth", n=16, seed=seed).state_dict().items()}


@lru_cache(maxsize=None)
def trained_like_file(variant: str, seed: int = 0) -> Path:
    """The trained-like checkpoint of ``variant`` as its official code saves it, written once per session."""
    from levit_deploy.families import resolve_variant

    family, _ = resolve_variant(variant)
    sd = trained_like_state_dict(variant, seed)
    path = FIXTURES["dir"] / f"{variant}-seed{seed}.pth"
    if family.name == "levit":
        torch.save({"model": to_official(sd)}, path)
    else:
        torch.save({"epoch": 299, "model": sd, "ema_model": None, "optimizer": None}, path)
    return path


@lru_cache(maxsize=None)
def trained_like_model(variant: str, seed: int = 0):
    """Our reference model loaded from the trained-like checkpoint file, as a user would. Read-only."""
    from levit_deploy.checkpoints import load

    return load(trained_like_file(variant, seed))


#: the variants above 4 GFLOPs, whose fp64 reference and floor draws cost about a second per input: judged on the
#: 7 photos and one input of each other kind (9 inputs instead of 15)
LEAN_REFERENCE = {"litv2_b", "litv2_m", "lightvit_base"}


@lru_cache(maxsize=None)
def trained_like_reference(variant: str, seed: int = 0):
    """The default reference set of ``trained_like_model(variant, seed)``, floors included (a leaner one for the
    largest variants, see LEAN_REFERENCE)."""
    from levit_deploy.reference import build_reference_set

    lean = dict(noise=1, synthetic=1) if variant in LEAN_REFERENCE else {}
    return build_reference_set(trained_like_model(variant, seed), **lean)


def trained_like_checkpoint(folder: Path, variant: str, layout: str = "official", fmt: str = "safetensors",
                            **kwargs) -> Path:
    """A trained-like checkpoint file (or HF folder) of ``variant`` in ``layout``, written into ``folder``."""
    return write_layout(folder, hf_state_dict(trained_like_hf(variant, **kwargs)), layout, fmt)


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """One levit-deploy cache per session; the ARM64 sysroot inside it persists between runs."""
    cache = tmp_path_factory.mktemp("levit-deploy-cache")
    FIXTURES["dir"] = tmp_path_factory.mktemp("checkpoints")
    (PERSISTENT_CACHE / "arm64").mkdir(parents=True, exist_ok=True)
    (cache / "arm64").symlink_to(PERSISTENT_CACHE / "arm64", target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEVIT_DEPLOY_CACHE", str(cache))
        yield cache


@pytest.fixture()
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache for a test about caching itself (downloads, the export cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LEVIT_DEPLOY_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def hf_128s():
    """(model, state dict) of a randomised Hugging Face LeViT-128S, shared by the tests."""
    model = hf_model("levit_128s", seed=0)
    return model, hf_state_dict(model)


@pytest.fixture(scope="session")
def trained_128s_path(tmp_path_factory):
    """A trained-like LeViT-128S in the official layout, shared by the tests."""
    return trained_like_checkpoint(tmp_path_factory.mktemp("trained128s"), "levit_128s")


@pytest.fixture(scope="session")
def model_128s():
    """The trained-like LeViT-128S (shared, read-only)."""
    return trained_like_model("levit_128s")


@pytest.fixture(scope="session")
def reference_128s():
    return trained_like_reference("levit_128s")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """artifacts(variant, target): the trained-like ``variant`` exported to ``target`` once per run: under
    pytest-xdist the first worker to need one exports it into a folder every worker shares (under a file lock) and
    the others open it. Read-only: copy one (``copy_artifact``) before changing anything."""
    import levit_deploy as ld
    from filelock import FileLock
    from levit_deploy.artifacts import Artifact, is_artifact, read_manifest, verify_artifact

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-artifacts"
    shared.mkdir(exist_ok=True)
    made = {}

    def get(variant: str, target: str):
        if (variant, target) not in made:
            folder = shared / f"{variant}-{target}"
            with FileLock(f"{folder}.lock"):
                if is_artifact(folder):
                    manifest, _ = read_manifest(folder)
                    made[variant, target] = Artifact(folder, verify_artifact(manifest, folder), manifest)
                else:
                    made[variant, target] = ld.export(trained_like_model(variant), target, folder,
                                                      reference=trained_like_reference(variant))
        return made[variant, target]
    return get


@pytest.fixture(scope="session")
def artifact_128s(artifacts):
    """artifact_128s(target): the trained-like LeViT-128S exported to ``target`` (see ``artifacts``)."""
    return lambda target: artifacts("levit_128s", target)


_MEASURED_CLI = """
import atexit, resource, runpy, sys
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("\\nPEAK_KIB " + line.split()[1] + "\\n")
atexit.register(peak)
sys.argv = ["levit-deploy", *sys.argv[2:]]
runpy.run_module("levit_deploy.cli", run_name="__main__")
"""


def run_measured(args, timeout: float, address_space: int = 0, **popen) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak RSS in KiB) of ``levit-deploy ARGS`` in a child process. The peak is the
    child's own VmHWM, read by the child at exit: getrusage/wait4 would report the forking test process's RSS too
    (Linux keeps the old memory's high-water mark across exec). ``address_space``: an RLIMIT_AS cap in bytes."""
    cmd = [sys.executable, "-c", _MEASURED_CLI, str(address_space), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **popen)
    err, _, peak = proc.stderr.rpartition("\nPEAK_KIB ")
    return proc.returncode, proc.stdout, err, int(peak.strip() or 0)


def copy_artifact(artifact, folder: Path) -> Path:
    shutil.copytree(artifact.folder, folder)
    return folder


@pytest.fixture(scope="session")
def int8_photos(tmp_path_factory):
    """(calib, judge) folders of real photos for int8 tests: 84 crops of scikit-image photos the gate does not use
    to calibrate on, 21 crops of the gate's photos to be judged on as the user's images."""
    from real_photos import GATE_PHOTOS, OTHER_PHOTOS, photo_crops, write_images

    root = tmp_path_factory.mktemp("int8-photos")
    return (write_images(root / "calib", photo_crops(OTHER_PHOTOS, 6, seed=1)),
            write_images(root / "judge", photo_crops(GATE_PHOTOS, 3, seed=2)))


@pytest.fixture(scope="session")
def in_distribution():
    """The shared in-distribution yardstick's folder (checkpoint, calib/, images/), when this checkout has it."""
    if not (IN_DISTRIBUTION / "levit_128s_in_distribution.pth").is_file():
        pytest.skip(f"{IN_DISTRIBUTION} is not present in this checkout")
    return IN_DISTRIBUTION


@pytest.fixture(scope="session")
def shared_checkpoint():
    """The project's common yardstick (../shared/checkpoints), when this checkout has it."""
    if not SHARED_CHECKPOINT.is_file():
        pytest.skip(f"{SHARED_CHECKPOINT} is not present in this checkout")
    return SHARED_CHECKPOINT


@pytest.fixture(scope="session")
def pixels():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(7))
