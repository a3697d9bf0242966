"""What a request may contain: the server's limits, the request schemas, and the checks, in OpenAI's error format.

Three places enforce limits. `LimitsMiddleware` (``middleware.py``) runs before any routing or parsing and
guards the server itself: API key (401), body size (413) and read time (408), concurrent requests (429). `parse_json_body` guards the
parser (strict UTF-8, no NaN, bounded nesting). The strict pydantic schemas and `resolve_sampling` guard the
model: every field's type, range and limit is checked before a request reaches the engine, so a bad request
is always a 4xx and never a 5xx.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ppolm.serve.engine import DecodingDefaults
from ppolm.serve.request import SamplingParams

SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class ServeLimits:
    """Limits of `ppolm serve`; a request past any of them gets a 4xx in OpenAI's error format."""

    max_concurrent_requests: int = 64
    """Generation requests in flight (queued or running, streams until their last chunk); more get 429."""
    max_body_bytes: int = 1_048_576
    """Largest request body in bytes; a larger one gets 413 before it is parsed."""
    max_tokens: int = 4096
    """Cap on max_tokens of one request (400 above); the prompt + max_tokens must also fit the model context."""
    max_stop_sequences: int = 4
    """How many stop strings one request may give (OpenAI's own limit is 4)."""
    max_stop_chars: int = 64
    """Longest stop string, in characters."""
    max_prompt_chars: int = 100_000
    """Longest prompt (completions) or sum of message contents (chat), in characters, checked before tokenizing."""
    max_messages: int = 256
    """Most messages in one chat request."""
    max_json_depth: int = 16
    """Deepest nesting of arrays/objects in a request body (a chat request with content parts needs 5)."""
    max_batch_size: int = 8
    """Most requests the engine runs in one model batch."""
    batch_wait_ms: float = 5.0
    """How long an idle engine waits for more requests to fill a batch, in milliseconds."""
    body_timeout_s: float = 10.0
    """Time allowed to send the whole request body; a slower upload gets 408 (and never holds a slot)."""
    request_timeout_s: float = 300.0
    """Deadline of one generation request from arrival to its last token; past it the row is dropped and the
    client gets 408 (or an error event in a stream). 0 disables."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ServeLimits.{name} must be a non-negative number, got {value!r}")
        if self.max_concurrent_requests < 1 or self.max_batch_size < 1 or self.max_tokens < 1:
            raise ValueError("ServeLimits: max_concurrent_requests, max_batch_size and max_tokens must be >= 1")


class ApiError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field is called 'type'
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # strict: "5" is not an int and 5.0 is not a max_tokens; forbid: a typo'd option is an error, as on OpenAI.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None


class SamplingRequest(_Strict):
    """Fields shared by completions and chat completions (OpenAI's names; top_k and ignore_eos are extras)."""

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


class CompletionRequest(SamplingRequest):
    """Body of POST /v1/completions: a string prompt or a list of token ids."""

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


class ChatRequest(SamplingRequest):
    """Body of POST /v1/chat/completions."""

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


def resolve_sampling(
    req: SamplingRequest,
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


def parse_json_body(raw: bytes, *, max_depth: int) -> Any:
    """Decode a request body: strict UTF-8, standard JSON (no NaN/Infinity), bounded nesting, no lone surrogates.

    Raises ApiError(400) naming what is wrong; never lets a decoder exception through as a 500.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, f"request body nests deeper than {max_depth} levels", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers with too many digits
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    _check_tree(value, max_depth)
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _check_tree(value: Any, max_depth: int) -> None:
    # Iterative walk: a recursive one would itself be the stack overflow this check exists to prevent.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise ApiError(400, f"request body nests deeper than {max_depth} levels", code="invalid_json")
            children = list(item.keys()) + list(item.values()) if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                # JSON escapes can spell lone surrogates (\\ud800) that no tokenizer accepts.
                raise ApiError(400, "request body contains an invalid unicode escape", code="invalid_json") from None
        elif isinstance(item, float) and not math.isfinite(item):
            raise ApiError(400, "numbers must be finite", code="invalid_json")
