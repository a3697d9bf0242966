"""ASGI middleware of `ppolm serve`: API key, body size and read time, concurrency, and request metrics.

Order matters for abuse: the body is read (bounded in size and in time) *before* a concurrency slot is taken,
so clients that upload slowly or never finish only hold a connection, never a place among the generation
requests; a normal request arriving meanwhile is served. Past the limit a generation request gets 429 with
`Retry-After`. The slot is held until the app returns, which for a stream is after its last chunk.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ppolm.serve.limits import ApiError, ServeLimits
from ppolm.serve.metrics import ServeMetrics

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
RETRY_AFTER_S = 1  # a slot frees when any running request ends; under load that is usually within a second


def error_response(
    status: int, message: str, *, code: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> list[Message]:
    """The ASGI messages of one error in OpenAI's format."""
    body = json.dumps(ApiError(status, message, code=code, type=kind).body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    if status == 401:
        raw.append((b"www-authenticate", b"Bearer"))
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": body},
    ]


class LimitsMiddleware:
    """API key on /v1 (401), body size (413) and body read time (408) on every request, concurrency on
    generation routes (429 + Retry-After); every request is counted in `metrics` when given."""

    def __init__(
        self, app: ASGIApp, limits: ServeLimits, api_key: str | None = None, metrics: ServeMetrics | None = None
    ) -> None:
        self.app = app
        self.limits = limits
        self.api_key = api_key
        self.metrics = metrics
        self.in_flight = 0  # touched only on the event loop thread, so no lock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [499]  # nginx's "client closed request" unless a response starts

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, counted)
        finally:
            if self.metrics is not None:
                self.metrics.observe(scope.get("path", ""), status[0], time.perf_counter() - t0)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
            await _send_all(send, error_response(401, "invalid or missing API key", code="invalid_api_key"))
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_body_bytes):
            await _send_all(send, self._too_large())
            return
        try:
            async with asyncio.timeout(self.limits.body_timeout_s or None):
                body = await self._read_body(receive)
        except TimeoutError:
            msg = f"request body not received within {self.limits.body_timeout_s:g} s"
            await _send_all(send, error_response(408, msg, code="request_timeout", headers={"connection": "close"}))
            return
        if body is None:
            await _send_all(send, self._too_large())
            return
        guarded = scope.get("method") == "POST" and path in GENERATION_PATHS
        if guarded and self.in_flight >= self.limits.max_concurrent_requests:
            msg = f"too many concurrent requests (limit {self.limits.max_concurrent_requests}); retry later"
            await _send_all(send, error_response(429, msg, code="rate_limit_exceeded", kind="rate_limit_error",
                                                 headers={"retry-after": str(RETRY_AFTER_S)}))
            return
        if guarded:
            self.in_flight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            if guarded:
                self.in_flight -= 1

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        value = headers.get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        expected = (self.api_key or "").encode()
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None past max_body_bytes (read at most one chunk further, never buffered whole)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)  # client left; the app will notice on its own
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> list[Message]:
        return error_response(
            413, f"request body larger than {self.limits.max_body_bytes} bytes", code="request_too_large"
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls wait for http.disconnect, which handlers listen for

    return replay


async def _send_all(send: Send, messages: list[Message]) -> None:
    for message in messages:
        await send(message)
