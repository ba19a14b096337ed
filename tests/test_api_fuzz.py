"""lab serve's API fuzzed from its own OpenAPI schema: for every route FastAPI lists, hypothesis draws
requests from the route's schema (each request body's JSON schema turned into a hypothesis strategy,
see from_schema), mixed with what a hostile or careless client sends (other JSON, bytes that are not
JSON or not UTF-8, numbers past any range, unknown run ids), with the right API key, a wrong one and none.

(hypothesis-jsonschema, the usual package for it, does not run with today's hypothesis, and
schemathesis brings a large tree along: from_schema below covers what FastAPI's schemas use.)

What must hold for every request: never a 500; every error is OpenAI's error JSON,
{"error": {"message", "type", "param", "code"}}; without the right key every API route answers 401,
before its body is read. Derandomized, a fixed number of examples per route, so the suite is the same
on every run; LAB_FUZZ_EXAMPLES=500 pytest tests/test_api_fuzz.py explores at random, further."""

import json
import os

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving import make_run
from starlette.testclient import TestClient

from lab_serve.api import Limits
from lab_serve.server import build

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = int(os.environ.get("LAB_FUZZ_EXAMPLES", "0"))
KEY = "s3cret"


def fuzz(examples: int):
    return settings(
        max_examples=EXAMPLES or examples,
        deadline=None,
        derandomize=not EXAMPLES,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """(client with the app served behind an API key, the app's OpenAPI schema). Small limits keep a
    valid completion a few tokens of a tiny model."""
    root = tmp_path_factory.mktemp("fuzzed") / "runs"
    make_run(root / "alpha", seed=0)
    (root / "alpha" / "metrics.jsonl").open("ab").write(b'{"step": 9, "loss": \xff\xfe}\n')  # damaged
    app, pool = build([root], limits=Limits(max_tokens=4, max_n=2, max_prompts=2), api_key=KEY)
    fastapi_app = app
    while not isinstance(fastapi_app, FastAPI):  # the ASGI layers around it (key check, body limit)
        fastapi_app = fastapi_app.app
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, fastapi_app.openapi()
    pool.close()


def operations(schema: dict) -> list[tuple[str, str, dict]]:
    return [(path, method, op) for path, ops in schema["paths"].items() for method, op in ops.items()]


ROUTES = [
    "GET /",
    "GET /v1/models",
    "POST /v1/completions",
    "POST /v1/chat/completions",
    "GET /api/runs",
    "GET /api/runs/{run_id}/metrics",
    "GET /api/runs/{run_id}/recipe",
    "GET /api/runs/{run_id}/generated",
]


def test_the_schema_lists_every_route(api):
    """ROUTES is what the schema lists: a new route is fuzzed as soon as it exists."""
    _, schema = api
    assert sorted(f"{method.upper()} {path}" for path, method, _ in operations(schema)) == sorted(ROUTES)


def from_schema(schema: dict, root: dict, depth: int = 0):
    """A hypothesis strategy for the values a JSON schema (as pydantic writes it for FastAPI) allows:
    $ref, anyOf, enum, const, object, array, string, integer, number, boolean, null, with their
    bounds. Values at and just past each bound are drawn often: that is where checks go wrong."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return from_schema(target, root, depth + 1)
    if "anyOf" in schema or "oneOf" in schema:
        return st.one_of([from_schema(s, root, depth + 1) for s in schema.get("anyOf", schema.get("oneOf"))])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": k}, root, depth) for k in kind])
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        optional = sorted(set(props) - required)
        fields = {k: from_schema(props[k], root, depth + 1) for k in props}
        return st.tuples(
            st.fixed_dictionaries({k: fields[k] for k in sorted(required)}),
            st.lists(st.sampled_from(optional), unique=True) if optional else st.just([]),
            st.data(),
        ).map(lambda t: {**t[0], **{k: t[2].draw(fields[k]) for k in t[1]}})
    if kind == "array":
        items = from_schema(schema.get("items", {}), root, depth + 1) if depth < 6 else st.none()
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", 5)
        return st.lists(items, min_size=lo, max_size=max(lo, min(hi, 5)))
    if kind == "string":
        return st.text(max_size=20)
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        edges = [b + d for b in (lo, hi) if b is not None for d in (-1, 0, 1)]
        return st.one_of(st.integers(lo, hi), st.sampled_from(edges or [0]))
    if kind == "number":
        lo = schema.get("minimum", schema.get("exclusiveMinimum"))
        hi = schema.get("maximum", schema.get("exclusiveMaximum"))
        edges = [float(b) + d for b in (lo, hi) if b is not None for d in (-1e-9, 0.0, 1e-9)]
        return st.one_of(st.floats(lo, hi, allow_nan=False), st.sampled_from(edges or [0.0]))
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return JSON  # no type given: anything


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
# Values a careless client puts in any field: out of every range, the wrong type, empty.
ODD = st.sampled_from([2**70, -(2**70), 2**63, -1, 0, 1e308, -0.0, "", "alpha", None, [], {}, True, "\udcff"])


def body_strategy(schema: dict, op: dict):
    """Bytes for the request body: from the operation's schema (often with a real model id, so the
    request gets as far as decoding), that with one field replaced by an odd value, any JSON, or
    bytes that are not JSON."""
    content = op.get("requestBody", {}).get("content", {}).get("application/json")
    junk = st.one_of(JSON.map(json.dumps), st.binary(max_size=30).map(lambda b: b.decode("latin-1")))
    if content is None:
        return st.one_of(st.just(None), junk.map(str.encode))
    valid = from_schema(content["schema"], schema)

    def with_model(body):
        if isinstance(body, dict) and "model" in body:
            body["model"] = "alpha"
        return body

    def with_odd(body_and_odd):
        body, (key, value) = body_and_odd
        if isinstance(body, dict) and body:
            body[sorted(body)[key % len(body)]] = value
        return body

    drawn = st.one_of(
        valid,
        valid.map(with_model),
        st.tuples(valid.map(with_model), st.tuples(st.integers(0, 20), ODD)).map(with_odd),
    )
    return st.one_of(drawn.map(lambda b: json.dumps(b)), junk).map(
        lambda s: s.encode("utf-8", "surrogatepass")
    )


def check(client, method: str, path: str, body, key) -> None:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    response = client.request(method, path, content=body, headers=headers)
    where = (method, path, body, key, response.status_code, response.text[:300])
    assert response.status_code < 500, where
    public = path == "/" or path.startswith("/static/")
    if key != KEY and not public:
        assert response.status_code == 401, where  # the key first: before the body is read
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, where
        assert isinstance(error["message"], str) and error["message"], where
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), where


RUN_IDS = st.one_of(
    st.just("alpha"), st.sampled_from(["..", "%2e%2e", "nope", "alpha/../alpha"]), st.text(max_size=8)
)
KEYS = st.sampled_from([KEY, None, "wrong", ""])


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_from_its_schema(api, route):
    client, schema = api
    method, path = route.split()
    op = schema["paths"][path][method.lower()]
    examples = 25 if method == "POST" else 8

    @fuzz(examples)
    @given(body=body_strategy(schema, op), key=KEYS, run_id=RUN_IDS, method_=st.sampled_from([method, "PUT"]))
    def fuzzed(body, key, run_id, method_):
        from urllib.parse import quote

        check(client, method_, path.replace("{run_id}", quote(run_id, safe="")), body, key)

    fuzzed()


def test_without_the_key_a_bad_body_is_401_not_400(api):
    client, schema = api
    for path, method, _ in operations(schema):
        if path == "/":
            continue  # the page: public, it asks for the key itself
        path = path.replace("{run_id}", "alpha")
        for body in (
            b"{not json",
            b"\xff\xfe",
            b"[1, 2]",
            b'{"model": "alpha", "seed": ' + str(2**70).encode() + b"}",
        ):
            response = client.request(
                method.upper(), path, content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 401, (method, path, body, response.text)
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_numbers_out_of_range_are_400_naming_the_field(api):
    client, _ = api
    auth = {"authorization": f"Bearer {KEY}"}
    for field, value in [
        ("seed", 2**70),
        ("seed", -(2**70)),
        ("top_k", 2**70),
        ("max_tokens", 2**70),
        ("n", -(2**70)),
    ]:
        body = {"model": "alpha", "prompt": "hi", "max_tokens": 2, field: value}
        response = client.post("/v1/completions", json=body, headers=auth)
        assert response.status_code == 400, (field, response.text)
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"] and "between" in error["message"], error
