"""Generation: the KV cache changes nothing but the speed, sampling filters do what they say, a seed
gives the same text, <|endoftext|> ends a sample, and `lab generate` turns mistakes into one message."""

import sys

import pytest
import torch

from lab.commands.cli import main
from lab.errors import LabError
from lab.inference.sampling import candidates, generate, sample
from lab.model import GPT
from lab.plugins import registry
from lab.recipe import load_recipe
from lab.runs.checkpoint import save
from lab.testing import assert_close_to_scale

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32"]


def tiny_model(path, attention="sdpa", vocab_size=101, seed=1, overrides=()):
    """A 2-layer model with large random weights: its logits are spread out, so greedy choices are
    no near-ties that float32 rounding could flip."""
    recipe = load_recipe(
        path, TINY + [f"model.vocab_size={vocab_size}", f"model.attention.name={attention}", *overrides]
    )
    torch.manual_seed(seed)
    model = GPT(recipe).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def record_calls(model):
    """(tokens fed, last-position logits (B, vocab)) of every forward call."""
    seen = []
    model.register_forward_hook(
        lambda module, args, out: seen.append((args[0].size(1), out[0][:, -1].clone()))
    )
    return seen


def every_attention_and_position():
    """Every installed attention with every installed position: the cache is the attention's own
    business, so each pair must decode the same with it as without it."""
    found = registry().components
    return [(a, p) for a in sorted(found["attention"]) for p in sorted(found["position"])]


@pytest.mark.parametrize("attention, position", every_attention_and_position())
def test_cached_and_uncached_greedy_agree_at_every_step(gpt_small_path, attention, position):
    overrides = [f"model.position.name={position}"]
    if "window" in registry().get("attention", attention).Config.model_fields:
        overrides.append("model.attention.window=8")  # shorter than the text, so the window acts
    prompt = torch.tensor([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]])
    try:
        model = tiny_model(gpt_small_path, attention, overrides=overrides)
        seen = record_calls(model)
        cached = generate(model, prompt, 24, temperature=0)  # 29 tokens: within block_size 32
    except LabError as e:  # a pair the attention refuses, e.g. a score bias for linear attention
        pytest.skip(str(e))
    cached_calls, seen[:] = list(seen), []
    uncached = generate(model, prompt, 24, temperature=0, use_cache=False)

    assert torch.equal(cached, uncached)
    assert [fed for fed, _ in cached_calls] == [5] + [1] * 23  # the prompt in one pass, then token by token
    assert [fed for fed, _ in seen] == list(range(5, 29))  # the whole text every step
    for step, ((_, a), (_, b)) in enumerate(zip(cached_calls, seen)):
        # Relative to the logits' scale: the cached path sums the same products in another order
        # (one query row against the cache vs the full matrix), so fp32 rounding differs by a few ulps
        # of the largest logit, and by more on kernels without FMA-wide reductions (AVX2-only CPUs):
        # up to 2.3e-6 of the scale on AVX-512, 3.5e-6 on an AVX2-only EPYC.
        assert_close_to_scale(a, b, 5e-5, f"logits at step {step}")


def test_sampling_with_a_seed_is_reproducible(gpt_small_path):
    model = tiny_model(gpt_small_path)
    prompt = torch.tensor([[1, 2, 3]])

    def draw(seed, **kw):
        return generate(
            model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw
        )

    assert torch.equal(draw(7), draw(7))
    assert torch.equal(draw(7, top_k=10, top_p=0.9), draw(7, top_k=10, top_p=0.9))
    assert not torch.equal(draw(7), draw(8))
    # the cache changes nothing but speed, sampled or not
    assert torch.equal(draw(7, top_k=10), draw(7, top_k=10, use_cache=False))


def test_top_k_and_top_p_keep_exactly_the_likeliest_tokens():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))

    def kept(**kw):
        survivors, ids = candidates(logits, **kw)
        return set(ids[0][survivors[0] > float("-inf")].tolist())

    assert kept(top_k=1) == {1}
    assert kept(top_k=3) == {1, 3, 2}
    assert kept(top_k=0) == kept(top_k=10) == {0, 1, 2, 3}
    assert kept(top_p=0.4) == {1}  # 0.5 alone reaches 0.4
    assert kept(top_p=0.75) == {1, 3}  # 0.5 + 0.3
    assert kept(top_p=0.9) == {1, 3, 2}  # 0.5 + 0.3 + 0.15
    assert kept(top_p=1.0) == {0, 1, 2, 3}
    assert kept(top_k=2, top_p=0.99) == {1, 3}  # top-k first, then the nucleus of what is left


def test_sampling_distribution_matches_transformers_warpers():
    """The probabilities sampling draws with, against transformers' top-k and top-p warpers
    (applied in that order, as transformers does)."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3

    def ours(**kw):
        kept, ids = candidates(logits, **kw)
        return torch.zeros_like(logits).scatter(-1, ids, torch.softmax(kept, dim=-1))

    def theirs(top_k=None, top_p=None):
        warped = logits.clone()
        if top_k:
            warped = lp.TopKLogitsWarper(top_k=top_k)(None, warped)
        if top_p:
            warped = lp.TopPLogitsWarper(top_p=top_p)(None, warped)
        return torch.softmax(warped, dim=-1)

    for kw in (
        {"top_k": 1},
        {"top_k": 5},
        {"top_k": 50},
        {"top_p": 0.1},
        {"top_p": 0.5},
        {"top_p": 0.9},
        {"top_k": 50, "top_p": 0.5},
    ):
        # probabilities: relative to the largest, as a flat top-k of many tokens has small ones
        assert_close_to_scale(ours(**kw), theirs(**kw), 1e-5, f"probabilities with {kw}")


def test_sampling_draws_kept_tokens_at_their_probabilities(gpt_small_path):
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3])).expand(20000, 4)
    drawn = sample(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(drawn.flatten(), minlength=4) / 20000
    assert freq[0] == 0 and (freq - torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95).abs().max() < 0.015

    model = tiny_model(gpt_small_path)
    prompt = torch.tensor([[1, 2, 3]])
    greedy = generate(model, prompt, 10, temperature=0)
    # top_k = 1 and a tiny nucleus leave one token: sampling at any temperature is greedy
    assert torch.equal(generate(model, prompt, 10, temperature=2.0, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 10, temperature=2.0, top_p=1e-6), greedy)


def test_eos_ends_the_sample_and_pads_rows_that_ended(gpt_small_path):
    model = tiny_model(gpt_small_path)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = generate(model, prompt, 20, temperature=0)
    eos = free[0, 3 + 4].item()  # the fifth token row 0 generates
    first = (free[:, 3:] == eos).int().argmax(dim=1)  # where each row first emits it
    stopped = generate(model, prompt, 20, temperature=0, eos_id=eos)

    row0_end = 3 + first[0].item() + 1
    assert torch.equal(stopped[0, :row0_end], free[0, :row0_end])
    assert (stopped[0, row0_end:] == eos).all()  # padded after its end
    if (free[1, 3:] == eos).any():  # stops when the last row ends
        assert stopped.size(1) == 3 + first.max().item() + 1
    else:
        assert stopped.size(1) == free.size(1)


def test_generation_leaves_the_model_in_training_mode_if_it_was(gpt_small_path):
    model = tiny_model(gpt_small_path).train()
    generate(model, torch.tensor([[1]]), 3)
    assert model.training


def test_cache_refuses_to_go_past_learned_positions_and_no_cache_slides(gpt_small_path):
    model = tiny_model(gpt_small_path)  # block_size 32
    with pytest.raises(LabError, match="lower --max-new-tokens to 22.*--no-cache"):
        generate(model, torch.ones(1, 10, dtype=torch.long), 23)
    with pytest.raises(LabError, match="prompt is 40 tokens.*at most 32.*--no-cache"):
        generate(model, torch.ones(1, 40, dtype=torch.long), 1)
    out = generate(model, torch.ones(1, 40, dtype=torch.long), 10, temperature=0, use_cache=False)
    assert out.shape == (1, 50)


# ----------------------------------------------------------------------------------- the command


@pytest.fixture
def run_dir(tmp_path, gpt_small_path):
    """A run folder with a tiny model that speaks GPT-2's vocabulary."""
    model = tiny_model(gpt_small_path, vocab_size=50257)
    save(tmp_path / "run", 0, model, load_recipe(gpt_small_path, TINY).to_toml(), {"step": 0})
    return tmp_path / "run"


def lab_generate(capsys, *args):
    status = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def test_lab_generate_same_seed_same_text_and_writes_the_file(run_dir, capsys, tmp_path):
    flags = ["--prompt", "Hello, world", "--max-new-tokens", "8", "--num-samples", "2", "--temperature", "1"]
    status, first, _ = lab_generate(capsys, run_dir, *flags, "--seed", "5", "-o", tmp_path / "s.txt")
    assert status == 0
    assert lab_generate(capsys, run_dir, *flags, "--seed", "5")[1] == first
    assert lab_generate(capsys, run_dir, *flags, "--seed", "6")[1] != first
    assert (
        first.startswith("--- sample 1/2 ---\nHello, world") and "\n--- sample 2/2 ---\nHello, world" in first
    )
    assert (tmp_path / "s.txt").read_text() == first


def test_lab_generate_greedy_is_the_same_with_and_without_cache(run_dir, capsys):
    flags = ["--prompt", "The", "--max-new-tokens", "16", "--temperature", "0", "--num-samples", "1"]
    cached = lab_generate(capsys, run_dir, *flags)
    assert cached[0] == 0
    assert lab_generate(capsys, run_dir, *flags, "--no-cache")[1] == cached[1]


def test_lab_generate_streams_to_a_terminal_and_prints_the_same_text(run_dir, capsys, monkeypatch):
    flags = ["--prompt", "Hi", "--max-new-tokens", "10", "--temperature", "0", "--num-samples", "1"]
    piped = lab_generate(capsys, run_dir, *flags)[1]
    writes = []
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    real_write = sys.stdout.write
    monkeypatch.setattr(sys.stdout, "write", lambda s: writes.append(s) or real_write(s))
    status, shown, _ = lab_generate(capsys, run_dir, *flags)
    assert status == 0 and shown == piped
    assert len([w for w in writes if w.strip()]) > 5  # token by token, not all at once


def test_lab_generate_stops_at_endoftext_unless_told_not_to(run_dir, capsys):
    """Make <|endoftext|> the only thing the model says: the final norm outputs a constant vector
    that points along that token's embedding."""
    import lab.runs

    recipe, model, _ = lab.runs.load(run_dir)
    eot = recipe.parts["tokenizer"].build().eot_id
    with torch.no_grad():
        model.tok_emb.weight[eot] = 10 * model.tok_emb.weight[eot] / model.tok_emb.weight[eot].norm()
        model.norm_f.weight.zero_()
        model.norm_f.bias.copy_(model.tok_emb.weight[eot])
    save(run_dir, 1, model, recipe.to_toml(), {"step": 1})

    flags = ["--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0", "--num-samples", "1"]
    assert lab_generate(capsys, run_dir, *flags)[1] == "--- sample 1/1 ---\nHello\n"
    ignored = lab_generate(capsys, run_dir, *flags, "--ignore-eos")[1]
    assert ignored == "--- sample 1/1 ---\nHello" + "<|endoftext|>" * 5 + "\n"


def test_lab_generate_draws_the_samples_as_one_batch(run_dir, capsys, monkeypatch):
    import lab.commands.generate
    import lab.inference.sampling

    batches = []
    real_stream = lab.inference.sampling.stream
    monkeypatch.setattr(
        lab.commands.generate,
        "stream",
        lambda model, idx, *a, **k: batches.append(idx.shape) or real_stream(model, idx, *a, **k),
    )
    flags = ["--prompt", "The", "--max-new-tokens", "6", "--temperature", "0"]
    status, three, _ = lab_generate(capsys, run_dir, *flags, "--num-samples", "3")
    assert status == 0 and batches == [(3, 1)]  # one stream of 3 rows, not 3 streams of one
    one = lab_generate(capsys, run_dir, *flags, "--num-samples", "1")[1]
    text = one.removeprefix("--- sample 1/1 ---\n")
    assert three == "".join(f"--- sample {i}/3 ---\n{text}" for i in (1, 2, 3))  # greedy: all alike


@pytest.mark.parametrize("terminal", [False, True], ids=["piped", "terminal"])
def test_lab_generate_ends_each_sample_at_its_own_endoftext(
    run_dir, capsys, monkeypatch, terminal, gpt_small_path
):
    """Rows of one batch end when they say <|endoftext|>, each on its own; what follows is dropped."""
    import lab.commands.generate
    import lab.inference.sampling

    eot = 50256
    steps = [[11, 12, 13], [eot, 14, 15], [16, eot, 17], [18, 19, 20]]  # token of each row, step by step
    monkeypatch.setattr(
        lab.commands.generate, "stream", lambda *a, **k: (torch.tensor([[t] for t in step]) for step in steps)
    )
    monkeypatch.setattr(sys.stdout, "isatty", lambda: terminal)
    status, out, _ = lab_generate(
        capsys, run_dir, "--prompt", "X", "--num-samples", "3", "--max-new-tokens", "4"
    )
    decode = load_recipe(gpt_small_path).parts["tokenizer"].build().decode
    expected = [[11], [12, 14], [13, 15, 17, 20]]
    assert status == 0
    assert out == "".join(f"--- sample {i + 1}/3 ---\nX{decode(row)}\n" for i, row in enumerate(expected))


def test_recipe_top_p_is_the_default_of_lab_generate(run_dir, capsys, gpt_small_path):
    import lab.runs

    flags = ["--prompt", "The", "--max-new-tokens", "8", "--num-samples", "1"]
    greedy = lab_generate(capsys, run_dir, *flags, "--temperature", "0")[1]
    _, model, _ = lab.runs.load(run_dir)
    nucleus = load_recipe(gpt_small_path, TINY + ["generate.top_p=1e-9", "generate.top_k=0"])
    save(run_dir, 1, model, nucleus.to_toml(), {"step": 1})
    # a nucleus this small holds only the likeliest token: sampling at temperature 2 is greedy
    assert lab_generate(capsys, run_dir, *flags, "--temperature", "2")[1] == greedy
    assert lab_generate(capsys, run_dir, *flags, "--temperature", "2", "--top-p", "1")[1] != greedy


def test_recipe_top_p_outside_0_1_is_refused(gpt_small_path):
    with pytest.raises(LabError, match=r"top_p = 1.5: Input should be less than or equal to 1"):
        load_recipe(gpt_small_path, ["generate.top_p=1.5"])
    with pytest.raises(LabError, match=r"top_p = 0: Input should be greater than 0"):
        load_recipe(gpt_small_path, ["generate.top_p=0"])


def test_generated_ids_can_be_trained_on(gpt_small_path):
    """Decoding runs in inference mode; the ids it returns must still be ordinary tensors."""
    model = tiny_model(gpt_small_path).train()
    out = generate(model, torch.tensor([[1, 2, 3]]), 5, temperature=0)
    _, loss = model(out[:, :-1], targets=out[:, 1:])
    loss.backward()
    assert model.tok_emb.weight.grad is not None


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--temperature", "-0.5"], "temperature must be >= 0"),
        (["--prompt", " ".join(["word"] * 40)], "prompt is 40 tokens; this model places at most 32"),
        (["--max-new-tokens", "40"], "lower --max-new-tokens to"),
        (["--prompt", "a", "--prompt-file", "p.txt"], "--prompt or --prompt-file, not both"),
    ],
)
def test_lab_generate_bad_settings_are_one_message(run_dir, capsys, flags, message):
    status, out, err = lab_generate(capsys, run_dir, *flags)
    assert status == 2 and out == ""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_lab_generate_missing_run_folder_or_checkpoint(tmp_path, capsys):
    status, _, err = lab_generate(capsys, tmp_path / "nope")
    assert status == 2 and "run folder not found" in err and "lab run" in err
    (tmp_path / "empty").mkdir()
    status, _, err = lab_generate(capsys, tmp_path / "empty")
    assert status == 2 and "no complete checkpoint" in err


# torch.compile on CPU takes tens of seconds; the eager decoding tests cover the same tokens
@pytest.mark.slow
def test_lab_generate_compile_gives_the_eager_greedy_text(run_dir, capsys):
    """The compiled decoding step (one compile: a tiny model, one shape) decodes the eager tokens."""
    flags = ["--prompt", "The", "--max-new-tokens", "12", "--temperature", "0", "--num-samples", "2"]
    eager = lab_generate(capsys, run_dir, *flags)
    status, out, err = lab_generate(capsys, run_dir, *flags, "--compile")
    assert status == 0 and out == eager[1]
    # On a machine where the compiled step disagrees with the eager one, lab says so and decodes eagerly.
    compiled = "compiled the decoding step for 2 row(s)" in err or "; decoding eagerly" in err
    assert compiled and "s of it compiling" in err
    assert lab_generate(capsys, run_dir, *flags, "--compile", "--no-cache")[0] == 2
