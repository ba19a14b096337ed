"""lab serve: the OpenAI client against a real server on loopback, bad input answered with OpenAI's
error JSON (and the server still serving), requests that never mix their text, a client that goes
away stopping its generation, the queue's limit, the API key, chat templates, the runs view's data."""

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from serving import Server, make_run

from lab.commands.cli import main
from lab.inference.sampling import generate
from lab.interfaces import ChatTemplate
from lab_serve.api import Limits
from lab_serve.batcher import Batcher, Job
from lab_serve.server import build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("served") / "runs"
    make_run(root / "alpha", seed=0)
    make_run(root / "beta", seed=1)
    (root / "not-a-run").mkdir()
    return root


@pytest.fixture(scope="module")
def served(runs):
    app, pool = build([runs])
    server = Server(app)
    yield server, pool
    server.stop()
    pool.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference(pool, model_id, prompt, n):
    """What greedy decoding of the prompt alone gives, through lab.inference.sampling."""
    s = pool.get(model_id)
    idx = torch.tensor([s.tokenizer.encode(prompt)])
    out = generate(s.model, idx, n, temperature=0, eos_id=s.tokenizer.eot_id)
    return s.tokenizer.decode(out[0, idx.size(1) :].tolist())


def test_models_lists_each_run_folder(client):
    assert sorted(m.id for m in client.models.list()) == ["alpha", "beta"]


def test_completion_is_greedy_decoding_and_streams_the_same_text(client, served):
    pool = served[1]
    got = client.completions.create(model="alpha", prompt="The meaning of life", max_tokens=12, temperature=0)
    assert got.choices[0].text == reference(pool, "alpha", "The meaning of life", 12)
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 12
    chunks = list(
        client.completions.create(
            model="alpha", prompt="The meaning of life", max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == got.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    with_usage = list(
        client.completions.create(
            model="alpha",
            prompt="Hi",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 5


def test_stream_is_openai_sse_ending_in_done(served):
    url = served[0].url
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={"model": "beta", "prompt": "Hi", "max_tokens": 3, "stream": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == "beta" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_n_seed_and_stop(client):
    a = client.completions.create(model="alpha", prompt="Once", max_tokens=8, n=3, seed=7, temperature=1.0)
    b = client.completions.create(model="alpha", prompt="Once", max_tokens=8, n=3, seed=7, temperature=1.0)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # a seed repeats
    full = (
        client.completions.create(model="alpha", prompt="Once", max_tokens=10, temperature=0).choices[0].text
    )
    stop = full[3:6]  # a string the greedy text contains
    cut = client.completions.create(model="alpha", prompt="Once", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_concurrent_requests_never_mix_their_text(served):
    """Twelve clients at once on two models, prompts of equal and different lengths (so some share
    a batch): each gets what its prompt alone gives."""
    url, pool = served
    prompts = [
        ("alpha", "One two three"),
        ("alpha", "Four five six"),
        ("alpha", "A longer prompt than those"),
        ("beta", "One two three"),
        ("beta", "Seven"),
        ("alpha", "Eight nine ten"),
    ] * 2
    expected = [reference(pool, m, p, 10) for m, p in prompts]
    got = [None] * len(prompts)

    def ask(i):
        body = {"model": prompts[i][0], "prompt": prompts[i][1], "max_tokens": 10, "temperature": 0}
        got[i] = httpx.post(url.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


@pytest.mark.parametrize(
    "texts",
    [
        ["one two", "three four", "five six", "seven eight"],
        ["one", "two three", "four five six seven", "eight nine ten"],
    ],
)
def test_rows_of_one_batch_decode_as_each_would_alone(served, texts):
    """Jobs submitted together share the running batch, also when their prompts differ in length
    (each row at its own position): each row gets what its prompt alone gives."""
    s = served[1].get("beta")
    batcher = Batcher(s.model, max_batch=8, eos_id=None)
    prompts = [s.tokenizer.encode(t) for t in texts]
    out, ended = [[] for _ in prompts], threading.Event()
    left = [len(prompts)]

    def end(reason):
        left[0] -= 1
        if left[0] == 0:
            ended.set()

    jobs = [
        Job(p, 6, lambda t, r=r: out[r].append(t) or True, end, temperature=0) for r, p in enumerate(prompts)
    ]
    batcher.submit(jobs)
    assert ended.wait(30)
    batcher.close()
    batcher.thread.join(10)  # its counters are final once the worker is out of its last step
    assert batcher.steps == 6  # all four joined the first step: 6 steps for 6 tokens each
    assert batcher.rows == 6 * len(prompts)
    for p, row in zip(prompts, out):
        alone = generate(s.model, torch.tensor([p]), 6, temperature=0)
        assert row == alone[0, len(p) :].tolist()


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"prompt": "x"}).encode(), 400, "model"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "../alpha", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "alpha", "prompt": "word " * 70}).encode(), 400, "prompt"),
    (json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 100000}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 64}).encode(), 400, "max_tokens"),
    (b'{"model": "alpha", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    (json.dumps({"model": "alpha", "prompt": "x", "temperature": -0.5}).encode(), 400, "temperature"),
    (json.dumps({"model": "alpha", "prompt": "x", "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"model": "alpha", "prompt": "x", "top_p": 1.5}).encode(), 400, "top_p"),
    (json.dumps({"model": "alpha", "prompt": "x", "n": 0}).encode(), 400, "n"),
    (json.dumps({"model": "alpha", "prompt": "x", "n": 99}).encode(), 400, "n"),
    (json.dumps({"model": "alpha", "prompt": 12}).encode(), 400, "prompt"),
    (json.dumps({"model": "alpha", "prompt": "x", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "alpha", "prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": "alpha", "prompt": "x", "stop": [1]}).encode(), 400, "stop"),
]


@pytest.mark.parametrize("body, status, param", BAD)
def test_bad_input_is_an_openai_error_and_the_server_keeps_serving(served, body, status, param):
    url = served[0].url
    r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert "Traceback" not in r.text
    ok = httpx.post(
        url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}, timeout=60
    )
    assert ok.status_code == 200


def test_the_openai_client_sees_errors_as_its_own_exceptions(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x")
    with pytest.raises(openai.BadRequestError, match="chat template"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])


def test_a_body_past_the_limit_is_413(served):
    r = httpx.post(
        served[0].url + "/v1/completions",
        content=b"{" + b" " * (2 << 20) + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def slow_down(model, seconds):
    """Every forward of the model takes at least `seconds`; returns the forwards' counter."""
    calls = []
    model.register_forward_hook(lambda *a: calls.append(time.sleep(seconds)))
    return calls


def test_a_client_that_goes_away_stops_its_generation(tmp_path):
    make_run(tmp_path / "slow")
    app, pool = build([tmp_path / "slow"])
    server = Server(app)
    try:
        calls = slow_down(pool.get("slow").model, 0.05)
        pool.get("slow").batcher.eos_id = None  # so only the client going away can end it early
        body = {"model": "slow", "prompt": "Hi", "max_tokens": 60, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
        deadline = time.monotonic() + 10
        while pool.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.in_flight() == 0
        assert len(calls) < 30  # of the 60 asked for
    finally:
        server.stop()
        pool.close()


def test_past_the_queue_requests_get_429_with_retry_after(tmp_path):
    make_run(tmp_path / "busy")
    app, pool = build([tmp_path / "busy"], limits=Limits(max_queue=2))
    server = Server(app)
    release = threading.Event()
    # Every decoding step held until released (a hook that returns None keeps the output as it is).
    pool.get("busy").model.register_forward_hook(lambda *a: release.wait(30) and None)
    try:
        body = {"model": "busy", "prompt": "Hi", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json={**body, "n": 2}) as r:
            deadline = time.monotonic() + 10  # the two choices are queued, prefilled or decoding
            while pool.in_flight() != 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert pool.in_flight() == 2
            over = httpx.post(server.url + "/v1/completions", json=body)
            assert over.status_code == 429
            assert over.headers["retry-after"] == "1"
            assert over.json()["error"]["type"] == "rate_limit_error"
            release.set()
            assert r.read().decode().endswith("data: [DONE]\n\n")
    finally:
        release.set()
        server.stop()
        pool.close()


def test_with_an_api_key_every_api_route_needs_it(runs):
    app, pool = build([runs], api_key="s3cret")
    server = Server(app)
    try:
        for path in ("/v1/models", "/api/runs", "/api/runs/alpha/metrics"):
            assert httpx.get(server.url + path).status_code == 401
            assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(server.url + path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        no_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            no_key.completions.create(model="alpha", prompt="x")
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and "s3cret" not in page.text
    finally:
        server.stop()
        pool.close()


def test_chat_completions_follow_the_tokenizers_template(served):
    server, pool = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    template = ChatTemplate(turn="{role}: {content}\n", reply="assistant:", stop=("\n",))
    tokenizer = pool.get("beta").tokenizer
    tokenizer.chat_template = template
    try:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
        got = client.chat.completions.create(model="beta", messages=messages, max_tokens=8, temperature=0)
        prompt = template.render(messages)
        want = reference(pool, "beta", prompt, 8).split("\n")[0]
        assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
        chunks = list(
            client.chat.completions.create(
                model="beta", messages=messages, max_tokens=8, temperature=0, stream=True
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    finally:
        tokenizer.chat_template = None


def test_runs_view_data_reads_only_the_served_folders(served):
    url = served[0].url
    listed = httpx.get(url + "/api/runs").json()["runs"]
    assert [r["id"] for r in listed] == ["alpha", "beta"]
    records = httpx.get(url + "/api/runs/alpha/metrics").json()["records"]
    assert any("val_loss" in r for r in records) and any("loss" in r for r in records)
    assert "[model]" in httpx.get(url + "/api/runs/alpha/recipe").text
    assert "tiny model" in httpx.get(url + "/api/runs/alpha/generated").text
    for bad in (
        "/api/runs/not-a-run/recipe",
        "/api/runs/..%2F..%2Fetc/recipe",
        "/api/runs/%2Fetc%2Fpasswd/recipe",
    ):
        assert httpx.get(url + bad).status_code == 404


def test_least_recently_used_model_makes_room(runs):
    app, pool = build([runs], max_models=1)
    server = Server(app)
    try:
        for model in ("alpha", "beta"):
            r = httpx.post(
                server.url + "/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2}
            )
            assert r.status_code == 200
        assert list(pool.loaded) == ["beta"]
    finally:
        server.stop()
        pool.close()


def test_lab_serve_says_how_to_install_the_extra(runs, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "fastapi", None)  # as if not installed
    assert main(["serve", str(runs)]) == 2
    assert "pip install 'lab[serve]'" in capsys.readouterr().err


def test_lab_serve_warns_when_it_listens_beyond_this_machine(runs, monkeypatch, capsys):
    import socket

    import uvicorn

    seen = {}
    monkeypatch.setattr(
        uvicorn.Server, "run", lambda self, sockets: seen.update(address=sockets[0].getsockname())
    )
    with socket.socket() as s:  # a port free now
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
    assert main(["serve", str(runs), "--host", "0.0.0.0", "--port", str(port)]) == 0
    err = capsys.readouterr().err
    assert seen["address"] == ("0.0.0.0", port)  # bound and listening before the URL was announced
    assert "other machines can reach" in err and "API is open" in err
    assert main(["serve", str(runs)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["serve", str(runs / "not-a-run")]) == 2
    assert "no run folders" in capsys.readouterr().err


def test_lab_serve_compiles_by_default_and_no_compile_decodes_eagerly(runs, monkeypatch, capsys):
    import socket

    import uvicorn

    import lab_serve.server

    built = []
    real_build = lab_serve.server.build
    # lab serve binds the port itself, then hands uvicorn the socket: stub the serving, not the binding.
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)
    monkeypatch.setattr(lab_serve.server, "build", lambda *a, **kw: built.append(kw) or real_build(*a, **kw))
    with socket.socket() as s:  # a port free now
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    assert main(["serve", str(runs), "--port", port]) == 0
    assert "compiled decoding (torch.compile)" in capsys.readouterr().err
    assert main(["serve", str(runs), "--no-compile", "--port", port]) == 0
    assert "eager decoding (--no-compile)" in capsys.readouterr().err
    assert [kw["compile"] for kw in built] == [True, False]
