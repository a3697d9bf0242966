"""`ppolm serve`: an OpenAI-compatible HTTP server (completions, chat completions, streaming) over one model.

Routes: POST /v1/completions, POST /v1/chat/completions (plain JSON or `stream: true` server-sent events in
OpenAI's chunk format ending with `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus). Request bodies are parsed
by hand (strict UTF-8 and JSON, bounded depth) and validated by strict pydantic schemas, so wrong types are
400s in OpenAI's error format rather than FastAPI's 422s. Only n=1 is supported; options clients send at
their neutral value by default (penalties 0, logprobs off, echo off) are accepted at that value only.
Every generation request has a deadline (ServeLimits.request_timeout_s, 408 past it) and a client that
disconnects, streaming or not, has its row dropped from the batch at the next step.
Launch: `ppolm serve --model DIR` (loopback by default), or `run_server` from Python.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.serve.engine import DecodingDefaults, Engine
from ppolm.serve.limits import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    ServeLimits,
    SamplingRequest,
    TextPart,
    parse_json_body,
    resolve_sampling,
)
from ppolm.serve.metrics import CONTENT_TYPE, ServeMetrics
from ppolm.serve.middleware import LimitsMiddleware
from ppolm.serve.request import DeadlineExceeded, Finish, GenRequest

log = logging.getLogger("ppolm.serve")


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
    metrics = ServeMetrics(engine.stats)
    app.state.engine = engine
    app.state.metrics = metrics
    app.add_middleware(LimitsMiddleware, limits=limits, api_key=api_key, metrics=metrics)

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

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_name, started)]}

    @app.get("/v1/models/{name:path}")
    async def model_card(name: str) -> dict[str, Any]:
        if name != model_name:
            raise _unknown_model(name, model_name)
        return _model_card(model_name, started)

    async def _parse(request: Request, schema: type[SamplingRequest]) -> Any:
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
        metrics.prompt_tokens.inc(len(prompt_ids))
        gen = engine.submit(prompt_ids, params, timeout_s=limits.request_timeout_s)
        return await _respond(request, engine, gen, req, model_name, chat=False)

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
        metrics.prompt_tokens.inc(len(prompt_ids))
        gen = engine.submit(prompt_ids, params, timeout_s=limits.request_timeout_s)
        return await _respond(request, engine, gen, req, model_name, chat=True)

    return app


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


async def _collect(events: AsyncIterator[str | Finish]) -> tuple[str, Finish]:
    parts: list[str] = []
    async for item in events:
        if isinstance(item, Finish):
            return "".join(parts), item
        parts.append(item)
    raise RuntimeError("the engine ended a request without a Finish")


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (the body was already read, so only http.disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _respond(
    request: Request, engine: Engine, gen: GenRequest, req: SamplingRequest, model_name: str, *, chat: bool
) -> Response:
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        # Starlette cancels the body iterator when the client disconnects, which cancels the row.
        usage = bool(req.stream_options and req.stream_options.include_usage)
        chunks = _stream(engine.events(gen), rid, created, model_name, chat=chat, include_usage=usage)
        return StreamingResponse(chunks, media_type="text/event-stream", headers={"cache-control": "no-cache"})
    # A plain request also watches its connection: a client that leaves must not keep its row decoding.
    collect = asyncio.ensure_future(_collect(engine.events(gen)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collect.done():
            collect.cancel()  # its events() generator marks the row cancelled
            gen.cancelled = True
    if not collect.done() or collect.cancelled():
        return Response(status_code=499)  # nobody is listening; the status only reaches the metrics
    try:
        text, finish = collect.result()
    except DeadlineExceeded as exc:
        raise ApiError(408, f"{exc}", type="timeout_error", code="deadline_exceeded") from None
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
    except DeadlineExceeded as exc:
        yield f"data: {json.dumps(ApiError(408, str(exc), type='timeout_error', code='deadline_exceeded').body())}\n\n"
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
    """Load a model (known name or exported directory) and serve it with uvicorn until interrupted."""
    model, tokenizer, served, defaults = load_served(model_name_or_dir, device=device, precision=precision)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", host)
    app = create_app(model, tokenizer, model_name=served, limits=limits, defaults=defaults, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


def load_served(
    model_name_or_dir: str, *, device: str | None = None, precision: str = "fp32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str, DecodingDefaults]:
    """(model, tokenizer, served model id, decoding defaults) for a known name or an exported directory.

    A directory's `ppolm_decoding.json` gives the default decoding settings (keys other than decoding ones are
    metadata and ignored); the served model id is the directory's name (or the known name). `device` defaults
    to CUDA when available.
    """
    from ppolm.models import load_model, load_tokenizer, resolve

    src = resolve(model_name_or_dir)
    model = load_model(model_name_or_dir, precision=precision)
    tokenizer = load_tokenizer(model_name_or_dir)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = DecodingDefaults.from_dir(src.path) if src.path and Path(src.path).is_dir() else DecodingDefaults()
    served = Path(src.path).name if src.kind == "local" else src.name
    return model, tokenizer, served, defaults


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run `app` with uvicorn in a daemon thread (port 0 = a free one); yield its base URL, stop on exit.

    The listening socket is bound here and handed to uvicorn, so there is no window in which another
    process can take the port (tests and the load bench use this).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # asyncio sets TCP_NODELAY only on sockets it knows are TCP, and uvicorn's copy of this one reports proto 0;
    # accepted connections inherit the option from here, else Nagle + delayed ACK add 40 ms to every response.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

