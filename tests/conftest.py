import os
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from layouts_ref import hf_model, hf_state_dict, write_layout  # noqa: E402
from trained_like import make_trained_like_  # noqa: E402

SHARED_CHECKPOINT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "levit_128s_trained_like.pth"


@lru_cache(maxsize=None)
def trained_like_hf(variant: str, calibration: str = "smooth", seed: int = 0, num_classes: int = 1000,
                    distilled: bool = True):
    """A Hugging Face LeViT with random weights whose BatchNorm statistics come from ``calibration``
    images (see trained_like.py). Cached for the session: treat it as read-only."""
    model = hf_model(variant, seed=seed, num_classes=num_classes, distilled=distilled)
    return make_trained_like_(model, calibration, n=32, seed=seed)


def trained_like_checkpoint(folder: Path, variant: str, layout: str = "official", fmt: str = "safetensors",
                            **kwargs) -> Path:
    """A trained-like checkpoint file (or HF folder) of ``variant`` in ``layout``, written into ``folder``."""
    return write_layout(folder, hf_state_dict(trained_like_hf(variant, **kwargs)), layout, fmt)


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
def shared_checkpoint():
    """The project's common yardstick (../shared/checkpoints), when this checkout has it."""
    if not SHARED_CHECKPOINT.is_file():
        pytest.skip(f"{SHARED_CHECKPOINT} is not present in this checkout")
    return SHARED_CHECKPOINT


@pytest.fixture(scope="session")
def pixels():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's cache; never reach the network from a test."""
    monkeypatch.setenv("LEVIT_DEPLOY_CACHE", str(tmp_path / "cache"))
