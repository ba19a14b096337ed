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


@pytest.fixture
def umask_027():
    """A umask other than the usual 022, so a test sees files follow the umask rather than 0644."""
    before = os.umask(0o027)
    yield 0o640  # the mode a new file then gets
    os.umask(before)


@pytest.fixture
def file_modes():
    """file_modes(folder) -> {name: permission bits} of the files in folder."""
    return lambda folder: {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    their ops are too small to share between threads, and on a busy machine each op would wait for the
    second thread to be scheduled. torchrun gives each process one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
