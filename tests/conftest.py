import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from layouts_ref import hf_model, hf_state_dict  # noqa: E402


@pytest.fixture(scope="session")
def hf_128s():
    """(model, state dict) of a randomised Hugging Face LeViT-128S, shared by the tests."""
    model = hf_model("levit_128s", seed=0)
    return model, hf_state_dict(model)


@pytest.fixture(scope="session")
def pixels():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's cache; never reach the network from a test."""
    monkeypatch.setenv("LEVIT_DEPLOY_CACHE", str(tmp_path / "cache"))
