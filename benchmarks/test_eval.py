"""`lab eval --text` on gpt_small's shape: the batched scorer beside a loop that scores one window
at a time, as Hugging Face's perplexity guide writes it (each window through the model with its
already-scored targets masked, the loss times the targets scored).

    one_window   model(x, y) per window, y = -1 where a target was scored before: the head and the
                 loss run over every position (fused loss, lab's default), the batch is one window
    batched      lab.inference.scoring.score_text: windows batched (8 per forward), the head only over the
                 targets each window scores

Both score the same windows (block_size 1024, stride 512) of tinyshakespeare; before timing, their
sums of -log p must agree to 1e-5 of their size. tokens_per_s counts the tokens scored.
"""

from pathlib import Path

import pytest
import torch

from benchmarks import machine
from lab.data.eval_sets import document_ids
from lab.inference.scoring import score_text, strided_spans
from lab.model import GPT
from lab.recipe import load_recipe

GPT_SMALL = Path(__file__).resolve().parent.parent / "recipes" / "gpt_small.toml"
CORPUS = Path(__file__).resolve().parent.parent / "plugins" / "lab_memmap" / "tinyshakespeare.txt"
WINDOWS = {"cpu": 8, "gpu": 128}  # windows of block_size scored per call
BATCH = 8


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(GPT_SMALL)


@pytest.fixture(scope="module")
def model(recipe, device):
    torch.manual_seed(0)
    return GPT(recipe).to(device).eval()


@pytest.fixture(scope="module")
def tokenizer(recipe):
    return recipe.parts["tokenizer"].build()


@pytest.fixture(scope="module")
def ids(tokenizer, recipe, size):
    """Text for WINDOWS windows at stride block_size / 2."""
    stride = recipe.model.block_size // 2
    want = WINDOWS["gpu" if size.train_batch > 4 else "cpu"] * stride + stride + 1
    text = CORPUS.read_text()
    while len(tokenizer.encode(text)) < want:
        text += text
    return document_ids(tokenizer, text)[:want]


def one_window_at_a_time(model, ids, block_size, stride, device):
    """The per-window loop: -sum log p over the scored targets."""
    seq = torch.tensor(ids, device=device)
    nll = 0.0
    with torch.inference_mode():
        for span in strided_spans(0, len(ids), block_size, stride):
            x = seq[span.start : span.start + span.length][None]
            y = seq[span.start + 1 : span.start + span.length + 1].clone()[None]
            y[:, : span.skip] = -1  # scored by an earlier window
            scored = span.length - span.skip
            nll += model(x, y)[1].item() * scored
    return nll


@pytest.mark.parametrize("variant", ["one_window", "batched"])
def test_eval_text(timed, benchmark, model, tokenizer, ids, recipe, device, variant):
    T = recipe.model.block_size
    stride = T // 2
    batched = lambda: score_text(model, tokenizer, [ids], stride, BATCH).nll  # noqa: E731
    single = lambda: one_window_at_a_time(model, ids, T, stride, device)  # noqa: E731
    expected = one_window_at_a_time(model, ids, T, stride, device)
    got = batched()
    assert abs(got - expected) <= 1e-5 * abs(expected), (got, expected)

    dtype = model.tok_emb.weight.dtype
    benchmark.group = (
        f"lab eval --text: gpt_small, {len(ids) - 1:,} tokens in windows of {T}, stride {stride} "
        f"{machine.label(device, dtype)}"
    )
    benchmark.extra_info.update(variant=variant, reference="one_window", items=len(ids) - 1)
    _, mean = timed(single if variant == "one_window" else batched)
    if mean:
        benchmark.extra_info.update(tokens_per_s=(len(ids) - 1) / mean)
