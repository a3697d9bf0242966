"""Batched generation for the server: requests wait on an asyncio queue, one worker thread runs them in batches.

The dispatcher coroutine takes the first waiting request, gathers up to ``max_batch_size - 1`` more that are
already queued (or arrive within ``batch_wait_s``), and hands the batch to a single worker thread, so the
event loop never blocks on the model. While a batch runs, new requests pile up in the queue and form the
next batch: under load the batch size grows by itself.

Generation is our own loop over a KV cache rather than ``model.generate`` because every row keeps its own
sampling settings (temperature, top_p, top_k, seed), its own stop strings and its own token budget, and
streamed text must leave the worker token by token. Rows that finish are dropped from the cache, so a short
request does not pay for a long neighbour. Deliberately left out: continuous batching (a request never joins
a batch already running), beam search, logprobs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.errors import ConfigError

DECODING_FILE = "ppolm_decoding.json"
GREEDY_BELOW = 1e-5  # temperatures under this are greedy: dividing logits by ~0 overflows to inf/NaN


@dataclass(frozen=True)
class DecodingDefaults:
    """Decoding settings a request falls back to (an exported model's ``ppolm_decoding.json``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    system_prompt: str | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> DecodingDefaults:
        """Read ``ppolm_decoding.json`` from a model directory; plain defaults when the file is absent."""
        file = Path(path) / DECODING_FILE
        if not file.is_file():
            return cls()
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{file}: expected a JSON object")
        unknown = set(raw) - {"temperature", "top_p", "top_k", "max_new_tokens", "stop", "system_prompt"}
        if unknown:
            raise ConfigError(f"{file}: unknown keys {sorted(unknown)}")
        base = cls()
        try:
            out = cls(
                temperature=float(raw.get("temperature", base.temperature)),
                top_p=float(raw.get("top_p", base.top_p)),
                top_k=int(raw.get("top_k", base.top_k)),
                max_new_tokens=int(raw.get("max_new_tokens", base.max_new_tokens)),
                stop=_stop_tuple(raw.get("stop")),
                system_prompt=raw.get("system_prompt"),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{file}: {exc}") from None
        if out.system_prompt is not None and not isinstance(out.system_prompt, str):
            raise ConfigError(f"{file}: system_prompt must be a string or null")
        if not (0 <= out.temperature <= 2 and 0 < out.top_p <= 1 and out.top_k >= 0 and out.max_new_tokens > 0):
            raise ConfigError(f"{file}: a value is out of range: {out}")
        return out


def _stop_tuple(value: object) -> tuple[str, ...]:
    # A lone string is one stop sequence, not a sequence of one-character stops.
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) and s for s in value):
        return tuple(value)
    raise ValueError(f"stop must be a string or a list of non-empty strings, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Settings of one row, already validated against the server limits."""

    temperature: float  # 0 (or < GREEDY_BELOW) means greedy
    top_p: float  # nucleus mass in (0, 1]
    top_k: int  # 0 disables
    max_new_tokens: int  # token budget of the completion
    stop: tuple[str, ...] = ()  # the completion ends before the first occurrence of any of these
    seed: int | None = None  # per-row generator seed; None draws a fresh one
    ignore_eos: bool = False  # keep going past EOS (benchmarks with fixed output lengths)


@dataclass(frozen=True)
class Finish:
    """Last event of a request: why it ended and its token counts."""

    reason: str  # 'stop' (EOS or stop string) or 'length'
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenRequest:
    """One queued request; the worker thread pushes text deltas, then a Finish (or an exception), to `events`."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the handler when its client went away; the worker drops the row

    def emit(self, item: str | Finish | BaseException) -> None:
        """Thread-safe push of one event to the waiting handler."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class EngineStats:
    """Counters exposed on /health and used by tests to check that requests were batched."""

    batches: int = 0  # model batches run
    rows: int = 0  # requests served in those batches
    max_batch_rows: int = 0  # largest batch seen
    tokens: int = 0  # completion tokens produced


class Engine:
    """Queue + dispatcher + one worker thread. Start it inside the running event loop (app lifespan)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.005,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.stats = EngineStats()
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._queue: asyncio.Queue[GenRequest] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Create the queue and the dispatcher in the current event loop."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppolm-gen")
        self._task = asyncio.create_task(self._dispatch())

    async def stop(self) -> None:
        """Cancel the dispatcher and wait for the batch in flight (if any) to end."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> GenRequest:
        """Queue one request; read its events with `events(req)`."""
        if self._queue is None:
            raise RuntimeError("engine not started")
        req = GenRequest(list(prompt_ids), params, asyncio.get_running_loop())
        self._queue.put_nowait(req)
        return req

    async def events(self, req: GenRequest) -> AsyncIterator[str | Finish]:
        """Yield the text deltas of `req`, then its Finish; marks it cancelled if the consumer stops early."""
        try:
            while True:
                item = await req.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            req.cancelled = True

    async def _dispatch(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            # A short window lets requests that arrive together share one batch even when the engine is idle.
            deadline = loop.time() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [r for r in batch if not r.cancelled]
            if batch:
                await loop.run_in_executor(self._executor, self._run_batch, batch)

    def _run_batch(self, batch: list[GenRequest]) -> None:
        # Only this (single) worker thread writes the stats, so they need no lock.
        self.stats.batches += 1
        self.stats.rows += len(batch)
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(batch))
        try:
            generate_batch(self.model, self.tokenizer, batch, self.eos_ids, self.pad_id, self.stats)
        except Exception as exc:  # noqa: BLE001 - every waiting handler must hear about the failure
            for req in batch:
                req.emit(exc)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


class _Row:
    """Text state of one row: generated ids, what has been streamed, and stop-string handling."""

    def __init__(self, req: GenRequest, tokenizer: PreTrainedTokenizerBase, device: torch.device) -> None:
        self.req = req
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded completion already emitted
        # A stop string may straddle tokens, so this many trailing characters stay unsent until they cannot
        # be the start of a stop string any more.
        self.hold = max((len(s) for s in req.params.stop), default=1) - 1
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed % (2**64))

    def push(self, token: int, eos: bool) -> bool:
        """Add one sampled token; emit the safe new text; return True when the row is finished."""
        p = self.req.params
        self.ids.append(token)
        if eos and not p.ignore_eos:
            return self._finish("stop", self._text(drop_last=True))
        text = self._text()
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._finish("stop", text[:cut])
        if len(self.ids) >= p.max_new_tokens:
            return self._finish("length", text)
        safe = len(text) - self.hold
        # A trailing U+FFFD may be the first bytes of a character whose rest comes with the next token; an
        # incomplete character decodes to exactly one U+FFFD, so holding back one is enough.
        if safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > self.sent:
            self.req.emit(text[self.sent : safe])
            self.sent = safe
        return False

    def _text(self, drop_last: bool = False) -> str:
        ids = self.ids[:-1] if drop_last else self.ids
        return self.tok.decode(ids, skip_special_tokens=True)

    def _finish(self, reason: str, text: str) -> bool:
        if len(text) > self.sent:
            self.req.emit(text[self.sent :])
        self.req.emit(Finish(reason, len(self.req.prompt_ids), len(self.ids)))
        return True


def sample_next(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
    """Next token per row from `logits` (B, V) with each row's temperature, top_k, top_p and generator."""
    logits = logits.float()
    params = [r.req.params for r in rows]
    greedy = logits.argmax(-1).tolist()
    sampled = [i for i, p in enumerate(params) if p.temperature >= GREEDY_BELOW]
    out = list(greedy)
    if not sampled:
        return out
    idx = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
    scaled = logits[idx] / temps[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=logits.device)
    top_k = torch.tensor([params[i].top_k or scaled.shape[-1] for i in sampled], device=logits.device)
    drop = rank[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already does.
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    for j, i in enumerate(sampled):
        pick = torch.multinomial(probs[j], 1, generator=rows[i].gen)
        out[i] = int(order[j, pick])
    return out


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    batch: list[GenRequest],
    eos_ids: frozenset[int],
    pad_id: int,
    stats: EngineStats | None = None,
) -> None:
    """Run `batch` to completion: left-pad the prompts, prefill once, then decode step by step over a KV cache.

    Position ids come from the attention mask (cumsum - 1), so left padding does not shift a row's positions;
    masks are built from prompt lengths, never from pad ids (pad == eos on some tokenizers).
    """
    device = next(model.parameters()).device
    rows = [_Row(r, tokenizer, device) for r in batch]
    width = max(len(r.prompt_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - len(r.prompt_ids) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = out.cache
    while rows:
        tokens = sample_next(out.logits[:, -1, :], rows)
        done = [row.req.cancelled or row.push(t, t in eos_ids) for row, t in zip(rows, tokens, strict=True)]
        if stats is not None:
            stats.tokens += len(rows)
        keep = [i for i, d in enumerate(done) if not d]
        if not keep:
            return
        if len(keep) < len(rows):
            # Finished rows leave the batch so the remaining steps only pay for live rows.
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, positions = mask[sel], positions[sel]
            rows = [rows[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        positions = positions[:, -1:] + 1
        step = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        out = model(input_ids=step, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        cache = out.cache
