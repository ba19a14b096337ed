import os

import pytest
import torch

# Two cores: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")


@pytest.fixture
def gpt_small_path():
    return os.path.join(RECIPES, "gpt_small.toml")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Tokenized corpora go to a per-session temporary cache, never the user's."""
    monkeypatch.setenv("LAB_CACHE", str(tmp_path_factory.getbasetemp() / "lab-cache"))
