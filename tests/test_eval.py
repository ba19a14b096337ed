"""`lab eval`: loss, perplexity and bits per byte of text in strided windows, multiple-choice tasks
and lm-evaluation-harness, checked against transformers on an imported GPT-2 and on a model made to
copy; and every mistake a user can make is one message with exit status 2."""

import json
import math
import socket

import pytest
import torch
from tiny import tiny_recipe

import lab.runs
from lab.commands.cli import main
from lab.data.eval_sets import Item
from lab.inference.scoring import encode_pair, loglikelihoods, strided_spans
from lab.model import GPT
from lab.recipe import load_recipe
from lab.runs.checkpoint import save
from lab.runs.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish? café ☕ naïve\n"
) * 3
ITEMS = [
    {"context": "The cat sat on the", "choices": ["mat.", "quantum chromodynamics.", "table"], "label": 0},
    {"context": "Hello, my name", "choices": ["is", "was", "zebra"], "label": 2},
    {"context": "One, two, three,", "choices": ["four", "five, six", "seven"], "label": 1},
]


@pytest.fixture(scope="module")
def gpt2_run(hf_model, tmp_path_factory):  # noqa: F811
    """The transformers model saved with save_pretrained and imported with `lab import-hf`."""
    folder = tmp_path_factory.mktemp("gpt2")
    hf_model.save_pretrained(folder / "hf")
    assert main(["import-hf", str(folder / "hf"), "--out", str(folder / "run")]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def tokenizer(gpt2_run):
    return lab.runs.load(gpt2_run)[0].parts["tokenizer"].build()


def run_lab(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# Text --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, block, stride", [(100, 16, 8), (100, 16, 16), (17, 16, 5), (5, 16, 4), (64, 8, 3)]
)
def test_windows_score_every_token_once_with_context(n, block, stride):
    spans = strided_spans(0, n, block, stride)
    scored = [s.start + 1 + j for s in spans for j in range(s.skip, s.length)]
    assert sorted(scored) == list(range(1, n))  # tokens 1 .. n-1, each once
    assert all(s.length == min(block, n - 1) for s in spans)  # full windows: one batch
    assert all(s.skip >= block - stride or s.start == 0 for s in spans[1:])  # overlapping context


def transformers_text_score(hf_model, ids: list[int], block: int, stride: int) -> tuple[float, int]:
    """(sum of -log p, tokens) by transformers over the same windows, one at a time."""
    n, length = len(ids), min(block, len(ids) - 1)
    nll, scored_through, count = 0.0, 0, 0
    for start in [*range(0, n - 1 - length, stride), n - 1 - length]:
        x = torch.tensor([ids[start : start + length]])
        with torch.no_grad():
            logprobs = hf_model(x).logits[0].double().log_softmax(-1)
        for j in range(length):
            if start + 1 + j > scored_through:
                nll -= logprobs[j, ids[start + 1 + j]].item()
                count += 1
        scored_through = start + length
    return nll, count


def test_text_loss_perplexity_and_bpb_equal_transformers(gpt2_run, hf_model, tokenizer, tmp_path, capsys):
    text = tmp_path / "play.txt"
    text.write_text(TEXT)
    status, out, _ = run_lab(capsys, "eval", gpt2_run, "--text", text, "--stride", 12, "--batch-size", 3)
    assert status == 0

    ids = [tokenizer.eot_id] + tokenizer.encode(TEXT)
    nll, count = transformers_text_score(hf_model, ids, 48, 12)
    saved = json.loads((gpt2_run / "eval.json").read_text())["text"][str(text)]
    loss = nll / count
    assert saved["tokens"] == count == len(ids) - 1
    assert saved["bytes"] == len(TEXT.encode("utf-8"))
    assert saved["loss"] == pytest.approx(loss, rel=1e-5)
    assert saved["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert saved["bpb"] == pytest.approx(nll / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)
    assert saved["step"] == 0 and saved["stride"] == 12
    assert f"{text}: loss {saved['loss']:.4f} | perplexity " in out and f"bpb {saved['bpb']:.4f}" in out


def test_jsonl_documents_and_a_prepared_folder(gpt2_run, hf_model, tokenizer, tmp_path, capsys):
    docs = write_jsonl(
        tmp_path / "docs.jsonl", [{"text": "Speak, speak."}, {"text": "You are all resolved."}]
    )
    assert (
        run_lab(
            capsys, "prepare", tmp_path / "docs.jsonl", "--out", tmp_path / "data", "--val-fraction", 0.5
        )[0]
        == 0
    )
    assert run_lab(capsys, "eval", gpt2_run, "--text", docs, tmp_path / "data")[0] == 0
    saved = json.loads((gpt2_run / "eval.json").read_text())["text"]
    # each document scored on its own, after an end-of-text token
    refs = [
        transformers_text_score(hf_model, [tokenizer.eot_id] + tokenizer.encode(t), 48, 24)
        for t in ("Speak, speak.", "You are all resolved.")
    ]
    assert saved[str(docs)]["loss"] == pytest.approx(
        sum(r[0] for r in refs) / sum(r[1] for r in refs), rel=1e-5
    )
    assert saved[str(tmp_path / "data")]["tokens"] > 0


# Multiple choice ---------------------------------------------------------------------------------


def test_choice_loglikelihoods_equal_transformers(gpt2_run, hf_model, tokenizer):
    _, model, _ = lab.runs.load(gpt2_run)
    pairs = [
        encode_pair(tokenizer, item["context"], " " + choice) for item in ITEMS for choice in item["choices"]
    ]
    ours = loglikelihoods(model, pairs, batch_size=4)
    for (context, continuation), (logprob, greedy) in zip(pairs, ours):
        whole = torch.tensor([context + continuation])
        with torch.no_grad():
            logprobs = hf_model(whole[:, :-1]).logits[0].double().log_softmax(-1)
        picks = logprobs[len(context) - 1 :].gather(1, torch.tensor(continuation)[:, None])
        assert logprob == pytest.approx(picks.sum().item(), rel=1e-5)
        assert greedy == bool((logprobs[len(context) - 1 :].argmax(-1) == torch.tensor(continuation)).all())


def test_continuation_tokens_are_lm_evals(tokenizer):
    # a context that ends in a space gives it to the continuation; the continuation's ids are those
    # of the whole text past the context's; an empty context is the end-of-text token
    assert encode_pair(tokenizer, "Hello ", "world") == (
        tokenizer.encode("Hello"),
        tokenizer.encode(" world"),
    )
    assert encode_pair(tokenizer, "", "Hi") == ([tokenizer.eot_id], tokenizer.encode("Hi"))


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory, tokenizer):
    """A model made to copy: no attention or MLP output, no positions, N(0, 1) tied embeddings, so the
    likeliest next token is always the current one. Its answers are known without training."""
    folder = tmp_path_factory.mktemp("copy")
    recipe = load_recipe(folder_recipe(folder))
    torch.manual_seed(0)
    model = GPT(recipe)
    with torch.no_grad():
        model.tok_emb.weight.normal_(0, 1)
        for module in model.modules():
            if getattr(module, "residual_projection", False):
                module.weight.zero_()
                module.bias.zero_()
        for p in model.position.parameters():
            p.zero_()
    save(folder / "run", 0, model, recipe.to_toml(), {"step": 0})
    return folder / "run"


def folder_recipe(folder):
    path = folder / "copy.toml"
    path.write_text(
        tiny_recipe(
            "copy", '[schedule]\nname = "cosine"\n', data=str(folder), model_extra="n_embd = 64\n"
        ).replace("n_embd = 32\n", "")
    )
    return path


COPY_ITEMS = [
    {"context": "red red red", "choices": ["blue", "red", "green"], "label": 1},
    {"context": "go go", "choices": ["go go go", "stop", "stop now please"], "label": 0},
    {"context": "one two three three", "choices": ["four", "five", "three three"], "label": 2},
    {"context": "Hello world world", "choices": ["world", "Earth"], "label": 0},
]


def test_a_model_that_copies_gets_every_copy_item(copy_run, tmp_path, capsys):
    task = write_jsonl(tmp_path / "copy.jsonl", COPY_ITEMS)
    status, out, _ = run_lab(capsys, "eval", copy_run, "--tasks", task, "--batch-size", 2)
    assert status == 0
    saved = json.loads((copy_run / "eval.json").read_text())["tasks"][str(task)]
    assert (saved["acc"], saved["acc_norm"], saved["items"]) == (1.0, 1.0, 4)
    assert f"{task}: acc 1.0000 | acc_norm 1.0000 (4 items)" in out


def test_hellaswag_items_are_cleaned_as_lm_eval_does(tmp_path):
    from lab.data.eval_sets import read_task

    line = {
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow [title] covering",
        "ctx_b": "the window of a car.",
        "endings": [" a woman  wearing [header] clothes", "b", "c", "d"],
        "label": "3",
    }
    item = read_task(write_jsonl(tmp_path / "hs.jsonl", [line]))[0]
    assert item == Item(
        "Removing ice from car: Then, the man writes over the snow. covering The window of a car.",
        ["a woman wearing clothes", "b", "c", "d"],
        3,
    )


# lm-evaluation-harness ---------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any attempt to reach the network fails the test; the datasets cache is the test's own."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def local_task(folder, name, items) -> None:
    data = write_jsonl(folder / f"{name}.jsonl", items)
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""")


def test_harness_task_gives_lab_evals_accuracy(gpt2_run, tmp_path, capsys, no_network):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # every label of every item too: whatever the model prefers, some answers are right and some wrong
    items = ITEMS + [{**item, "label": k} for item in ITEMS for k in range(len(item["choices"]))]
    local_task(tasks, "local_mc", items)
    status, out, err = run_lab(
        capsys,
        "eval",
        gpt2_run,
        "--harness",
        "local_mc",
        "--include-path",
        tasks,
        "--tasks",
        tasks / "local_mc.jsonl",
    )
    assert status == 0, err
    saved = json.loads((gpt2_run / "eval.json").read_text())
    ours, harness = saved["tasks"][str(tasks / "local_mc.jsonl")], saved["harness"]["local_mc"]
    assert harness["acc"] == ours["acc"] and harness["acc_norm"] == ours["acc_norm"]
    assert 0 < ours["acc"] < 1 and 0 < ours["acc_norm"] < 1 and ours["items"] == 12
    assert "local_mc" in out


def test_lab_is_an_lm_eval_model(copy_run, tmp_path, no_network):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import lab_eval.harness  # noqa: F401  (registers "lab")

    lm = get_model("lab").create_from_arg_string(f"run_dir={copy_run}", {"batch_size": 2, "device": "cpu"})
    request = lambda kind, args: Instance(kind, {}, args, 0)  # noqa: E731
    [(logprob, greedy)] = lm.loglikelihood([request("loglikelihood", ("red red", " red red"))])
    assert greedy and logprob > -1.0
    [text] = lm.generate_until([request("generate_until", ("go go", {"until": ["\n"], "max_gen_toks": 3}))])
    assert text == " go go go"
    [text] = lm.generate_until(
        [request("generate_until", ("go go", {"until": [" go go"], "max_gen_toks": 8}))]
    )
    assert text == ""  # cut at the stop string
    [rolling] = lm.loglikelihood_rolling([request("loglikelihood_rolling", ("go go go go",))])
    assert rolling < 0

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    local_task(tasks, "copy_mc", COPY_ITEMS)
    out = lm_eval.simple_evaluate(
        model="lab",
        model_args=f"run_dir={copy_run}",
        tasks=["copy_mc"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        device="cpu",
    )
    assert out["results"]["copy_mc"]["acc,none"] == 1.0


# Mistakes ----------------------------------------------------------------------------------------


def assert_one_message(status, err, *words):
    assert status == 2 and "Traceback" not in err and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


def test_a_run_folder_without_checkpoint(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    text = tmp_path / "a.txt"
    text.write_text("hello")
    assert_one_message(
        *run_lab(capsys, "eval", tmp_path / "run", "--text", text)[::2], "no complete checkpoint"
    )


def test_a_file_that_is_not_text(gpt2_run, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    assert_one_message(
        *run_lab(capsys, "eval", gpt2_run, "--text", binary)[::2], "weights.bin is not a text file"
    )
    latin1 = tmp_path / "old.txt"
    latin1.write_bytes("café".encode("latin-1"))
    assert_one_message(*run_lab(capsys, "eval", gpt2_run, "--text", latin1)[::2], "not UTF-8", "iconv")


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"context": "a", "choices": ["b", "c"], "label": 0', ["line 2 is not valid JSON"]),
        ('{"context": "a", "choices": ["b", "c"], "label": 2}', ["line 2: label 2", "0 to 1"]),
        ('{"context": "a", "choices": ["b"], "label": 0}', ["line 2", "at least two"]),
        ('{"context": "a", "answers": ["b", "c"], "label": 0}', ["line 2 has neither"]),
    ],
)
def test_a_task_file_with_a_bad_line(gpt2_run, tmp_path, capsys, line, words):
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    assert_one_message(*run_lab(capsys, "eval", gpt2_run, "--tasks", task)[::2], "task.jsonl", *words)


def test_an_empty_task_and_empty_text(gpt2_run, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert_one_message(
        *run_lab(capsys, "eval", gpt2_run, "--tasks", tmp_path / "empty.jsonl")[::2], "holds no items"
    )
    (tmp_path / "empty.txt").write_text("")
    assert_one_message(
        *run_lab(capsys, "eval", gpt2_run, "--text", tmp_path / "empty.txt")[::2], "no text to score"
    )


def test_a_stride_longer_than_the_block(gpt2_run, tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("hello")
    assert_one_message(
        *run_lab(capsys, "eval", gpt2_run, "--text", text, "--stride", 49)[::2],
        "--stride 49",
        "block_size, 48",
    )


def test_nothing_to_score(gpt2_run, capsys):
    assert_one_message(*run_lab(capsys, "eval", gpt2_run)[::2], "--text FILE")


def test_lm_eval_not_installed(gpt2_run, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.delitem(sys.modules, "lab_eval.harness", raising=False)
    status, _, err = run_lab(capsys, "eval", gpt2_run, "--harness", "hellaswag")
    assert_one_message(status, err, "pip install 'lab[eval]'")


@pytest.mark.slow  # imports lm-eval's task registry
def test_an_unknown_harness_task(gpt2_run, capsys, no_network):
    pytest.importorskip("lm_eval")
    assert_one_message(
        *run_lab(capsys, "eval", gpt2_run, "--harness", "no_such_task_xyz")[::2],
        "unknown lm-eval task(s): no_such_task_xyz",
    )


# During training: [eval] -------------------------------------------------------------------------


def recipe_with_eval(tmp_path, eval_table: str) -> str:
    import test_train

    path = test_train.tiny_recipe(tmp_path)
    with open(path, "a") as f:
        f.write("\n[eval]\n" + eval_table)
    return path


def test_eval_table_scores_text_and_tasks_with_the_val_loss(tmp_path, capsys):
    (tmp_path / "play.txt").write_text(TEXT)
    task = write_jsonl(tmp_path / "copy.jsonl", COPY_ITEMS)
    recipe = recipe_with_eval(
        tmp_path, f'text = ["{tmp_path / "play.txt"}"]\ntasks = ["{task}"]\nstride = 16\n'
    )
    assert main(["run", recipe]) == 0
    out = capsys.readouterr().out
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]  # with every val loss: first, every eval_interval, last
    for r in evals:
        assert set(r) >= {
            "eval/play.txt/loss",
            "eval/play.txt/perplexity",
            "eval/play.txt/bpb",
            "eval/copy.jsonl/acc",
            "eval/copy.jsonl/acc_norm",
        }
        assert r["eval/play.txt/perplexity"] == pytest.approx(math.exp(r["eval/play.txt/loss"]))
    assert evals[-1]["eval/play.txt/loss"] < evals[0]["eval/play.txt/loss"]
    last = evals[-1]
    assert (
        f"step     8/8 | play.txt: loss {last['eval/play.txt/loss']:.4f} | perplexity "
        f"{last['eval/play.txt/perplexity']:.2f} | bpb {last['eval/play.txt/bpb']:.4f}"
    ) in out
    assert f"step     8/8 | copy.jsonl: acc {last['eval/copy.jsonl/acc']:.4f} | acc_norm " in out

    # the scores are those lab eval gives the final checkpoint
    assert (
        main(
            [
                "eval",
                str(tmp_path / "run"),
                "--text",
                str(tmp_path / "play.txt"),
                "--stride",
                "16",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())["text"][str(tmp_path / "play.txt")]
    assert saved["loss"] == pytest.approx(last["eval/play.txt/loss"], rel=1e-5)


def test_a_bad_eval_file_stops_the_run_before_training(tmp_path, capsys):
    task = tmp_path / "bad.jsonl"
    task.write_text('{"context": "a", "choices": ["b", "c"], "label": 5}\n')
    recipe = recipe_with_eval(tmp_path, f'tasks = ["{task}"]\n')
    status = main(["run", recipe])
    err = capsys.readouterr().err
    assert_one_message(status, err, "bad.jsonl line 1: label 5")
    assert not (tmp_path / "run" / "checkpoints").exists()
