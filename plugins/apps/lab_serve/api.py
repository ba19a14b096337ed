"""The HTTP side: OpenAI's completions and chat completions, the runs view's data, and the page.

Every error is OpenAI's error JSON, {"error": {"message", "type", "param", "code"}}, with a 4xx
status for anything a client sent wrong; an unexpected failure is logged and answered with a 500
that carries no traceback. Text leaves a request's own Job only (see batcher.py): requests in flight
share batches, never text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lab.errors import LabError
from lab_serve.batcher import Job
from lab_serve.runs import Busy, ModelPool, RunTable, Served

log = logging.getLogger("lab_serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class Limits:
    max_tokens: int = 1024  # new tokens a choice may ask for (and never past the model's positions)
    max_n: int = 8  # choices a request may ask for
    max_prompts: int = 8  # prompts in one completions request
    max_body: int = 1 << 20  # bytes of a request body
    request_seconds: float = 300.0  # a completion stops ("length") after this long
    max_queue: int = 64  # completions waiting or decoding, all models together; past it, 429


# ------------------------------------------------------------------------------------ errors


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


def error_response(status, message, type="invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first problem pydantic found, as one sentence, and the field it is about."""
    err = exc.errors()[0]
    # loc is the path to the value, with the type tried for each member of a union mixed in
    tags = ("body", "str", "int", "float", "bool", "list", "dict", "none")
    loc = [str(x) for x in err.get("loc", ()) if str(x) not in tags and "[" not in str(x)]
    if err.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(err.get("ctx", {}).get("error", "")), None
    if not loc and err.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    param = ".".join(loc) or None
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param or 'body'}: {message}", param


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(LabError)
    async def _lab(request, exc: LabError):
        return error_response(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, "internal server error (see the server's log)", type="server_error")


class KeyCheck:
    """With an API key, every route but the page and its files answers 401 to a request without it,
    before anything of the request (its body, its JSON, its size) is read: the outermost layer."""

    PUBLIC = ("/", "/favicon.ico")

    def __init__(self, app, api_key: str | None):
        self.app, self.expected = app, None if api_key is None else f"Bearer {api_key}".encode()

    def allows(self, scope) -> bool:
        if self.expected is None or scope["path"] in self.PUBLIC or scope["path"].startswith("/static/"):
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.allows(scope):
            return await self.app(scope, receive, send)
        response = error_response(
            401, "a valid API key is needed: send `Authorization: Bearer KEY`", code="invalid_api_key"
        )
        await response(scope, receive, send)


class BodyLimit:
    """Read a request body whole, up to max_body bytes (413 past it), before the app sees it."""

    def __init__(self, app, max_body: int):
        self.app, self.max_body = app, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                response = error_response(
                    413, f"the request body is over {self.max_body} bytes", code="body_too_large"
                )
                return await response(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # then only http.disconnect: how a gone client is seen
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------- requests


def in_range(lo: int, hi: int) -> AfterValidator:
    """An integer checked at the edge, so no number out of torch's range reaches it: the 400 names
    the field (see _validation_message) and the range. Annotated[StrictInt, in_range(lo, hi)]."""

    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return AfterValidator(check)


INT64 = (-(2**63), 2**63 - 1)  # a seed: torch.manual_seed takes int64 (seed + the choice's index too)
Seed = Annotated[StrictInt, in_range(INT64[0], INT64[1] - 64)]
# Counts (max_tokens, n) are checked against the limits later.
Count = Annotated[StrictInt, in_range(-(2**31), 2**31 - 1)]
Temperature = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Stop = StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None


class StreamOptions(BaseModel):
    include_usage: StrictBool = False  # a last chunk with no choices and the usage, before [DONE]


class Sampling(BaseModel):
    """What OpenAI's completions and chat completions share, plus top_k (as vLLM and llama.cpp add)."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    max_tokens: Count | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[StrictInt, in_range(0, 2**31 - 1)] | None = None
    n: Count | None = None
    stop: Stop = None
    seed: Seed | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(Sampling):
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] = ""


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Count | None = None


# ------------------------------------------------------------------------------- completions


class Choice:
    """One choice's text as it is made: decodes its tokens, holds back what could be the start of a
    stop string or half a multi-byte character, and puts what is safe to send on the request's queue."""

    def __init__(self, index: int, tokenizer, stops: list[str], put):
        self.index, self.tokenizer, self.stops, self.put = index, tokenizer, stops, put
        self.ids: list[int] = []
        self.text = ""  # decoded so far, up to a stop string
        self.sent = 0  # characters of it already put

    def on_token(self, token: int) -> bool:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return True  # half a character: the next token completes it
        for s in self.stops:
            at = text.find(s, max(0, self.sent - len(s)))
            if at >= 0:
                self.text = text[:at]
                return False
        self.text = text
        safe = len(text) - held_back(text, self.stops)
        if safe > self.sent:
            self.put(("text", self.index, text[self.sent : safe]))
            self.sent = safe
        return True

    def on_end(self, reason: str) -> None:
        if len(self.text) > self.sent and not reason.startswith("error"):
            self.put(("text", self.index, self.text[self.sent :]))
            self.sent = len(self.text)
        self.put(("end", self.index, reason))


def held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of text could begin a stop string."""
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)


@dataclass
class Prepared:
    served: Served
    prompts: list[list[int]]
    settings: dict
    n: int
    stops: list[str]
    max_tokens: int  # new tokens each choice may make


class Completions:
    """Turns a checked request into jobs on the model's worker and its events into responses."""

    def __init__(self, pool: ModelPool, limits: Limits):
        self.pool, self.limits = pool, limits

    async def prepare(self, req: Sampling, texts: list[str], max_tokens: int | None) -> Prepared:
        lim = self.limits
        n = 1 if req.n is None else req.n
        if not 1 <= n <= lim.max_n:
            raise APIError(400, f"n must be between 1 and {lim.max_n}, got {n}", param="n")
        if len(texts) > lim.max_prompts:
            raise APIError(
                400, f"at most {lim.max_prompts} prompts a request, got {len(texts)}", param="prompt"
            )
        max_tokens = 16 if max_tokens is None else max_tokens  # OpenAI's default
        if not 1 <= max_tokens <= lim.max_tokens:
            raise APIError(
                400,
                f"max_tokens must be between 1 and {lim.max_tokens}, got {max_tokens}",
                param="max_tokens",
            )
        if self.pool.in_flight() + n * len(texts) > lim.max_queue:
            raise APIError(
                429,
                f"the server is busy ({lim.max_queue} completions in flight); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        served = await self.model(req.model)
        prompts = [self.prompt_ids(served, t, max_tokens) for t in texts]
        stops = [] if req.stop is None else [req.stop] if isinstance(req.stop, str) else list(req.stop)
        stops = [s for s in stops if s]
        settings = dict(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or None,
            top_p=req.top_p,
            seed=req.seed,
        )
        return Prepared(served, prompts, settings, n, stops, max_tokens)

    async def model(self, model_id: str):
        try:
            return await run_in_threadpool(self.pool.get, model_id)
        except KeyError:
            raise APIError(
                404,
                f"the model '{model_id}' does not exist; GET /v1/models lists the runs served",
                param="model",
                code="model_not_found",
            ) from None
        except Busy:
            raise APIError(
                503,
                "every loaded model is busy, and none can make room for this one; retry shortly",
                type="server_error",
                code="models_busy",
                headers={"Retry-After": "5"},
            ) from None
        except LabError as e:
            raise APIError(
                500,
                f"the run '{model_id}' cannot be loaded: {e}",
                type="server_error",
                code="model_unavailable",
            ) from None

    @staticmethod
    def prompt_ids(served, text: str, max_tokens: int) -> list[int]:
        tok = served.tokenizer
        ids = tok.encode(text)
        if not ids:  # nothing to continue: start where a new document starts
            if tok.eot_id is None:
                raise APIError(
                    400,
                    "the prompt is empty and this model's tokenizer has no end-of-text token to start from",
                    param="prompt",
                )
            ids = [tok.eot_id]
        if len(ids) + max_tokens > served.max_len:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens and max_tokens is {max_tokens}: together "
                f"more than the {served.max_len} positions model '{served.id}' knows; shorten "
                f"the prompt or lower max_tokens to {max(served.max_len - len(ids), 0)}",
                param="prompt" if len(ids) >= served.max_len else "max_tokens",
                code="context_length_exceeded",
            )
        return ids

    def start(self, p: Prepared, loop) -> tuple[asyncio.Queue, list[Job]]:
        """Submit every choice (prompt x n) as a job; their events arrive on the returned queue."""
        queue: asyncio.Queue = asyncio.Queue()

        def put(event):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:
                pass  # the event loop has closed: the server is stopping

        deadline = time.monotonic() + self.limits.request_seconds
        jobs = []
        for i, ids in enumerate(p.prompts):
            for k in range(p.n):
                seed = p.settings["seed"]
                choice = Choice(i * p.n + k, p.served.tokenizer, p.stops, put)
                jobs.append(
                    Job(
                        ids,
                        p.max_tokens,
                        choice.on_token,
                        choice.on_end,
                        deadline=deadline,
                        **{**p.settings, "seed": None if seed is None else seed + k},
                    )
                )
        p.served.batcher.submit(jobs)
        return queue, jobs


def finish_reason(reason: str) -> str:
    return "stop" if reason in ("stop", "cancelled") else "length" if reason == "length" else "error"


def usage(p: Prepared, tokens: int) -> dict:
    prompt = sum(map(len, p.prompts)) * p.n
    return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}


async def collect(queue, jobs, request: Request) -> tuple[dict[int, str], dict[int, str]]:
    """(texts, finish reasons) by choice index, once every job has ended; cancels them if the client
    goes away first."""
    texts: dict[int, str] = {}
    ends: dict[int, str] = {}
    try:
        while len(ends) < len(jobs):
            try:
                kind, index, value = await asyncio.wait_for(queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return texts, ends
                continue
            if kind == "text":
                texts[index] = texts.get(index, "") + value
            else:
                ends[index] = value
        return texts, ends
    finally:
        for j in jobs:
            j.cancel()  # no-op for the ones that ended


def usage_chunk(req: Sampling, rid: str, created: int, p: Prepared):
    """What makes the stream's last chunk, if the request asked for the usage."""
    if req.stream_options is None or not req.stream_options.include_usage:
        return None
    kind = "chat.completion.chunk" if rid.startswith("chat") else "text_completion"
    return lambda tokens: {
        "id": rid,
        "object": kind,
        "created": created,
        "model": req.model,
        "choices": [],
        "usage": usage(p, tokens),
    }


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def stream_events(queue, jobs, chunk, last_chunk, usage_chunk=None):
    """Server-sent events: a chunk for each piece of text, one with each choice's finish_reason,
    then (when asked for) one with the usage, then `data: [DONE]`. A client that goes away cancels
    the generator, and with it the jobs."""
    ended = 0
    try:
        while ended < len(jobs):
            kind, index, value = await queue.get()
            if kind == "text":
                yield sse(chunk(index, value))
            else:
                ended += 1
                yield sse(last_chunk(index, finish_reason(value)))
        if usage_chunk is not None:
            yield sse(usage_chunk(sum(j.made for j in jobs)))
        yield "data: [DONE]\n\n"
    finally:
        for j in jobs:
            j.cancel()


def raise_if_failed(ends: dict[int, str], index: int) -> None:
    reason = ends.get(index, "cancelled")
    if reason.startswith("error"):
        raise APIError(500, f"generation failed ({reason[7:]}); see the server's log", type="server_error")


# ------------------------------------------------------------------------------------- the app


def make_app(table: RunTable, pool: ModelPool, limits: Limits | None = None, api_key: str | None = None):
    limits = limits or Limits()
    completions = Completions(pool, limits)
    app = FastAPI(title="lab serve", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)

    def run_or_404(run_id: str) -> str:
        if table.folder(run_id) is None and run_id not in table.refresh():
            raise APIError(404, f"no run named '{run_id}'", code="run_not_found")
        return run_id

    api = APIRouter()  # the API: KeyCheck guards it, before the body is read

    @api.get("/v1/models")
    async def models():
        runs = table.refresh()
        data = [
            {"id": run_id, "object": "model", "created": int(folder.stat().st_mtime), "owned_by": "lab"}
            for run_id, folder in runs.items()
            if table.describe(run_id)["servable"]
        ]
        return {"object": "list", "data": data}

    @api.post("/v1/completions")
    async def complete(req: CompletionRequest, request: Request):
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        p = await completions.prepare(req, texts, req.max_tokens)
        queue, jobs = completions.start(p, asyncio.get_running_loop())
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index, text, reason=None):
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": req.model,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}],
            }

        if req.stream:
            events = stream_events(
                queue, jobs, chunk, lambda i, r: chunk(i, "", r), usage_chunk(req, rid, created, p)
            )
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        texts_by, ends = await collect(queue, jobs, request)
        for i in range(len(jobs)):
            raise_if_failed(ends, i)
        made = sum(j.made for j in jobs)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": i,
                    "text": texts_by.get(i, ""),
                    "logprobs": None,
                    "finish_reason": finish_reason(ends.get(i, "cancelled")),
                }
                for i in range(len(jobs))
            ],
            "usage": usage(p, made),
        }

    @api.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        served = await completions.model(req.model)
        template = served.chat_template
        if template is None:
            raise APIError(
                400,
                f"model '{req.model}' has no chat template: its tokenizer "
                f"({getattr(served.tokenizer, 'name', '?')}) was not trained on conversations. "
                "Use /v1/completions with a plain prompt",
                param="model",
                code="no_chat_template",
            )
        text = template.render([m.model_dump() for m in req.messages])
        req.stop = [
            *([] if req.stop is None else [req.stop] if isinstance(req.stop, str) else req.stop),
            *template.stop,
        ]
        p = await completions.prepare(req, [text], max_tokens)
        queue, jobs = completions.start(p, asyncio.get_running_loop())
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index, delta, reason=None):
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}],
            }

        if req.stream:

            async def events():
                for i in range(len(jobs)):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}))
                async for e in stream_events(
                    queue,
                    jobs,
                    lambda i, t: chunk(i, {"content": t}),
                    lambda i, r: chunk(i, {}, r),
                    usage_chunk(req, rid, created, p),
                ):
                    yield e

            return StreamingResponse(
                events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        texts_by, ends = await collect(queue, jobs, request)
        for i in range(len(jobs)):
            raise_if_failed(ends, i)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts_by.get(i, "")},
                    "logprobs": None,
                    "finish_reason": finish_reason(ends.get(i, "cancelled")),
                }
                for i in range(len(jobs))
            ],
            "usage": usage(p, sum(j.made for j in jobs)),
        }

    # The runs view's data. Run ids come from the table; the files read are fixed names in its folders.
    @api.get("/api/runs")
    async def runs():
        return {"runs": [table.describe(r) for r in table.refresh()]}

    @api.get("/api/runs/{run_id}/metrics")
    async def metrics(run_id: str):
        return {"records": await run_in_threadpool(table.metrics, run_or_404(run_id))}

    @api.get("/api/runs/{run_id}/recipe")
    async def recipe(run_id: str):
        return PlainTextResponse(table.recipe(run_or_404(run_id)))

    @api.get("/api/runs/{run_id}/generated")
    async def generated(run_id: str):
        return PlainTextResponse(table.generated(run_or_404(run_id)))

    app.include_router(api)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.pool, app.state.table = pool, table
    return KeyCheck(BodyLimit(app, limits.max_body), api_key)
