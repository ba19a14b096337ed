import os

import pytest
import torch
from tiny import HF_SHAPE, TRAIN, tiny_recipe, write_tiny_run

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


@pytest.fixture(scope="module")
def hf_model():
    """transformers' GPT-2 at tiny.HF_SHAPE with GPT-2's initialisation, but large weights past the
    token embedding: then greedy decoding says something other than one token over and over, and
    position mistakes would show."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "wte" not in name and "lm_head" not in name:
                p.normal_(0, 0.3)
    return model


@pytest.fixture
def tiny_run(tmp_path):
    """write(rest=TRAIN, model_extra="", out="run") -> the path of a tiny recipe (tests/tiny.py: two
    layers, 32 wide) on counting tokens, training 4 steps into tmp_path/out: the recipe a test that
    needs a run writes, instead of a copy of its own."""

    def write(rest: str = TRAIN, model_extra: str = "", out: str = "run") -> str:
        return write_tiny_run(tmp_path, tiny_recipe("tiny", rest, model_extra=model_extra), out=out)

    return write
