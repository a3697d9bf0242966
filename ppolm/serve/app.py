"""`ppolm serve`: an OpenAI-compatible HTTP server (completions, chat completions, streaming) over one model.

Routes: POST /v1/completions, POST /v1/chat/completions (plain JSON or `stream: true` server-sent events in
OpenAI's chunk format ending with `data: [DONE]`), GET /v1/models, GET /health. Request bodies are parsed
by hand (strict UTF-8 and JSON, bounded depth) and validated by strict pydantic schemas, so wrong types are
400s in OpenAI's error format rather than FastAPI's 422s. Only n=1 is supported; options clients send at
their neutral value by default (penalties 0, logprobs off, echo off) are accepted at that value only.
Launch: `ppolm serve MODEL` (loopback by default), or `run_server` from Python.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.serve.engine import DecodingDefaults, Engine, Finish, SamplingParams
from ppolm.serve.limits import ApiError, LimitsMiddleware, ServeLimits, parse_json_body

log = logging.getLogger("ppolm.serve")
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class _Strict(BaseModel):
    # strict: "5" is not an int and 5.0 is not a max_tokens; forbid: a typo'd option is an error, as on OpenAI.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extra field (vLLM's spelling); 0 disables
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # extra field (vLLM's spelling) for fixed-length benchmarks
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    echo: bool | None = None
    best_of: int | None = None
    logprobs: int | None = None
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None


# Options accepted only at the value that means "off": (field, value is neutral).
_NEUTRAL = {
    "presence_penalty": lambda v: v == 0,
    "frequency_penalty": lambda v: v == 0,
    "logit_bias": lambda v: not v,
    "echo": lambda v: not v,
    "best_of": lambda v: v == 1,
    "logprobs": lambda v: not v,
    "top_logprobs": lambda v: not v,
    "suffix": lambda v: not v,
}


def context_length(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens the model attends over: the config's position limit, else the tokenizer's, else 2048."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 2048


def create_app(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_name: str,
    limits: ServeLimits,
    defaults: DecodingDefaults,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` under the id `model_name`; its engine is `app.state.engine`."""
    engine = Engine(model, tokenizer, max_batch_size=limits.max_batch_size, batch_wait_s=limits.batch_wait_ms / 1000)
    n_ctx = context_length(model, tokenizer)
    vocab = len(tokenizer)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()

    app = FastAPI(title="ppolm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.add_middleware(LimitsMiddleware, limits=limits, api_key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(exc.status_code, str(exc.detail), code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(exc.errors()[:1])).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        err = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        s = engine.stats
        return {"status": "ok", "model": model_name, "batches": s.batches, "rows": s.rows, "tokens": s.tokens}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name, started)]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        if name != model_name:
            raise _unknown_model(name, model_name)
        return _model_card(model_name, started)

    async def _parse(request: Request, schema: type[_Sampling]) -> Any:
        ctype = request.headers.get("content-type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, f"content-type must be application/json, got '{ctype}'", code="unsupported_media_type")
        raw = parse_json_body(await request.body(), max_depth=limits.max_json_depth)
        if not isinstance(raw, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        try:
            req = schema.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(400, f"{param}: {first['msg']}", param=param, code="invalid_value") from None
        if req.model != model_name:
            raise _unknown_model(req.model, model_name)
        return req

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        req: CompletionRequest = await _parse(request, CompletionRequest)
        if isinstance(req.prompt, str):
            _check_chars(len(req.prompt), limits, "prompt")
            prompt_ids = tokenizer.encode(req.prompt, add_special_tokens=False)
        else:
            if any(not 0 <= t < vocab for t in req.prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_value")
            prompt_ids = list(req.prompt)
        params = resolve_sampling(req, req.max_tokens, len(prompt_ids), n_ctx, limits, defaults)
        return await _respond(engine, req, prompt_ids, params, model_name, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> JSONResponse | StreamingResponse:
        req: ChatRequest = await _parse(request, ChatRequest)
        if not req.messages:
            raise ApiError(400, "messages must not be empty", param="messages", code="invalid_value")
        if len(req.messages) > limits.max_messages:
            msg = f"{len(req.messages)} messages, limit {limits.max_messages}"
            raise ApiError(400, msg, param="messages", code="invalid_value")
        messages = [{"role": m.role, "content": _content(m.content)} for m in req.messages]
        _check_chars(sum(len(m["content"]) for m in messages), limits, "messages")
        if defaults.system_prompt and all(m["role"] != "system" for m in messages):
            messages.insert(0, {"role": "system", "content": defaults.system_prompt})
        prompt_ids = _chat_prompt(tokenizer, messages)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            msg = "give max_tokens or max_completion_tokens, not both"
            raise ApiError(400, msg, param="max_completion_tokens", code="invalid_value")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = resolve_sampling(req, max_tokens, len(prompt_ids), n_ctx, limits, defaults)
        return await _respond(engine, req, prompt_ids, params, model_name, chat=True)

    return app


def resolve_sampling(
    req: _Sampling,
    max_tokens: int | None,
    prompt_tokens: int,
    n_ctx: int,
    limits: ServeLimits,
    defaults: DecodingDefaults,
) -> SamplingParams:
    """Merge a request with the model's decoding defaults and check every value against its range and limit."""
    def bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
        return ApiError(400, f"{param}: {message}", param=param, code=code)

    if req.n is not None and req.n != 1:
        raise bad("n", f"only n=1 is supported, got {req.n}")
    for name, neutral in _NEUTRAL.items():
        value = getattr(req, name, None)
        if value is not None and not neutral(value):
            raise bad(name, f"not supported by this server (got {value!r})")
    temperature = defaults.temperature if req.temperature is None else req.temperature
    if not 0 <= temperature <= 2:  # written so that NaN fails too
        raise bad("temperature", f"must be in [0, 2], got {temperature}")
    top_p = defaults.top_p if req.top_p is None else req.top_p
    if not 0 < top_p <= 1:
        raise bad("top_p", f"must be in (0, 1], got {top_p}")
    top_k = defaults.top_k if req.top_k is None else req.top_k
    if top_k < 0:
        raise bad("top_k", f"must be >= 0 (0 disables), got {top_k}")
    if req.seed is not None and not SEED_RANGE[0] <= req.seed <= SEED_RANGE[1]:
        raise bad("seed", f"must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
    stop = defaults.stop if req.stop is None else ((req.stop,) if isinstance(req.stop, str) else tuple(req.stop))
    if len(stop) > limits.max_stop_sequences:
        raise bad("stop", f"{len(stop)} stop sequences, limit {limits.max_stop_sequences}")
    if any(not s or len(s) > limits.max_stop_chars for s in stop):
        raise bad("stop", f"each stop string must have 1 to {limits.max_stop_chars} characters")
    if prompt_tokens == 0:
        raise bad("prompt", "the prompt is empty")
    if prompt_tokens >= n_ctx:
        msg = f"the prompt has {prompt_tokens} tokens, the model's context length is {n_ctx} tokens"
        raise bad("prompt", msg, code="context_length_exceeded")
    if max_tokens is None:
        # An unset budget is the default, trimmed to what the context has room for.
        max_tokens = max(1, min(defaults.max_new_tokens, limits.max_tokens, n_ctx - prompt_tokens))
    elif not 1 <= max_tokens <= limits.max_tokens:
        raise bad("max_tokens", f"must be in [1, {limits.max_tokens}], got {max_tokens}")
    elif prompt_tokens + max_tokens > n_ctx:
        msg = (
            f"the model's context length is {n_ctx} tokens, but {prompt_tokens + max_tokens} were requested "
            f"({prompt_tokens} in the prompt + {max_tokens} max_tokens); shorten the prompt or lower max_tokens"
        )
        raise bad("max_tokens", msg, code="context_length_exceeded")
    return SamplingParams(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        max_new_tokens=int(max_tokens),
        stop=stop,
        seed=req.seed,
        ignore_eos=bool(req.ignore_eos),
    )


def _check_chars(n: int, limits: ServeLimits, param: str) -> None:
    if n > limits.max_prompt_chars:
        msg = f"{param}: {n} characters, limit {limits.max_prompt_chars}"
        raise ApiError(400, msg, param=param, code="invalid_value")


def _content(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja templates reject some role orders with arbitrary errors
        raise ApiError(400, f"messages: the chat template rejected them: {exc}", param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _unknown_model(name: str, served: str) -> ApiError:
    msg = f"model '{name[:200]}' does not exist; this server serves '{served}'"
    return ApiError(404, msg, param="model", code="model_not_found")


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "ppolm"}


async def _respond(
    engine: Engine, req: _Sampling, prompt_ids: list[int], params: SamplingParams, model_name: str, *, chat: bool
) -> JSONResponse | StreamingResponse:
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    gen = engine.submit(prompt_ids, params)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = _stream(engine.events(gen), rid, created, model_name, chat=chat, include_usage=usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    parts: list[str] = []
    finish: Finish | None = None
    async for item in engine.events(gen):
        if isinstance(item, Finish):
            finish = item
        else:
            parts.append(item)
    assert finish is not None
    text = "".join(parts)
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish.reason}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    body = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model_name,
        "choices": [choice],
        "usage": _usage(finish),
    }
    return JSONResponse(body)


def _usage(finish: Finish) -> dict[str, int]:
    total = finish.prompt_tokens + finish.completion_tokens
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens, "total_tokens": total}


async def _stream(
    events: AsyncIterator[str | Finish], rid: str, created: int, model_name: str, *, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format; the last line is `data: [DONE]`."""
    head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created}
    head["model"] = model_name

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {**head, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    try:
        if chat:
            yield chunk(None, None, first=True)
        async for item in events:
            if isinstance(item, Finish):
                yield chunk(None, item.reason)
                if include_usage:
                    yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(item)})}\n\n"
            elif item:
                yield chunk(item, None)
    except Exception as exc:  # noqa: BLE001 - headers are gone; the error travels in the stream
        log.exception("generation failed mid-stream")
        err = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")
        yield f"data: {json.dumps(err.body())}\n\n"
    yield "data: [DONE]\n\n"


def run_server(
    model_name_or_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: ServeLimits = ServeLimits(),
    *,
    device: str | None = None,
    precision: str = "fp32",
) -> None:
    """Load a model (known name or exported directory) and serve it with uvicorn until interrupted.

    A directory's `ppolm_decoding.json` gives the default decoding settings; the served model id is the
    directory's name (or the known name). `device` defaults to CUDA when available.
    """
    from ppolm.models import load_model, load_tokenizer, resolve

    src = resolve(model_name_or_dir)
    model = load_model(model_name_or_dir, precision=precision)
    tokenizer = load_tokenizer(model_name_or_dir)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = DecodingDefaults.from_dir(src.path) if src.path and Path(src.path).is_dir() else DecodingDefaults()
    served = Path(src.path).name if src.kind == "local" else src.name
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    app = create_app(model, tokenizer, model_name=served, limits=limits, defaults=defaults, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a daemon thread (port 0 = a free one); yield its base URL, stop on exit.

    The listening socket is bound here and handed to uvicorn, so there is no window in which another
    process can take the port (tests and the load bench use this).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="ppolm-serve")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

