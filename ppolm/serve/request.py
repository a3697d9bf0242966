"""What the engine (``ppolm.serve.engine``) and the decode batch (``ppolm.serve.batch``) share: a queued request,
its sampling settings, the events it hears back (text deltas, then a Finish or an exception) and the engine's
counters. Both import it; neither imports the other's internals, so the worker loop and the batch stay one-way."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # temperatures under this are greedy: dividing logits by ~0 overflows to inf/NaN


class DeadlineExceeded(Exception):
    """A request ran past its deadline; its row was dropped from the batch."""


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
    deadline: float | None = None  # time.monotonic() past which the row is dropped; None = no deadline
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the handler when its client went away; the worker drops the row

    def emit(self, item: str | Finish | BaseException) -> None:
        """Thread-safe push of one event to the waiting handler."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop closed (server shutting down): nobody is listening any more
            self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass
class EngineStats:
    """Counters exposed on /health and /metrics, and used by tests to check that requests were batched."""

    batches: int = 0  # prefill passes (each admits one or more requests into the running batch)
    rows: int = 0  # requests admitted
    steps: int = 0  # decode steps run
    max_batch_rows: int = 0  # most rows decoding together
    tokens: int = 0  # completion tokens produced
    running: int = 0  # rows decoding now
    queued: int = 0  # requests waiting for a place in the batch
