"""Generation for the server: handlers queue requests, one worker thread runs continuous batching over them.

The worker thread loops: drop rows whose client left or whose deadline passed, admit waiting requests into the
running batch (up to ``max_batch_size`` rows), run one decode step (``ppolm.serve.batch``). The event loop
never blocks on the model; text deltas travel back to each handler through its own asyncio queue.

Generation is our own loop over a KV cache rather than ``model.generate`` because every row keeps its own
sampling settings (temperature, top_p, top_k, seed), its own stop strings and its own token budget, and
streamed text must leave the worker token by token. Deliberately left out: chunked prefill (a long prompt
stalls the running rows for one forward pass), paged KV memory, beam search, logprobs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.errors import ConfigError
from ppolm.serve.batch import DecodeBatch
from ppolm.serve.request import DeadlineExceeded, EngineStats, Finish, GenRequest, SamplingParams
from ppolm.tasks.base import DECODING_FILE

log = logging.getLogger("ppolm.serve")

DECODING_KEYS = frozenset({"temperature", "top_p", "top_k", "max_new_tokens", "stop", "system_prompt"})


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
        # The trainers and the pipeline also record where the model came from (task, stage, base_model); other
        # tools may add their own keys. Those are metadata for people, not decoding settings: ignored here.
        metadata = sorted(set(raw) - DECODING_KEYS)
        if metadata:
            log.info("%s: ignoring non-decoding keys %s", file, metadata)
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


class Engine:
    """Inbox + one worker thread running continuous batching. Start it inside the running event loop."""

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
        self._inbox: queue.Queue[GenRequest] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        """Start the worker thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="ppolm-gen", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the worker after its current step."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    def submit(self, prompt_ids: list[int], params: SamplingParams, timeout_s: float | None = None) -> GenRequest:
        """Queue one request (dropped after `timeout_s` seconds if given); read its events with `events(req)`."""
        if self._thread is None:
            raise RuntimeError("engine not started")
        deadline = time.monotonic() + timeout_s if timeout_s else None
        req = GenRequest(list(prompt_ids), params, asyncio.get_running_loop(), deadline)
        self._inbox.put(req)
        self.stats.queued = self._inbox.qsize()
        return req

    async def events(self, req: GenRequest) -> AsyncIterator[str | Finish]:
        """Yield the text deltas of `req`, then its Finish; marks it cancelled if the consumer stops early.

        Raises DeadlineExceeded when the request's deadline passes, whether or not the worker noticed first.
        """
        try:
            while True:
                remaining = None if req.deadline is None else req.deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise DeadlineExceeded("request deadline exceeded")
                try:
                    item = await asyncio.wait_for(req.events.get(), remaining)
                except TimeoutError:
                    raise DeadlineExceeded("request deadline exceeded") from None
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            req.cancelled = True

    def _take(self, block: bool) -> list[GenRequest]:
        """Waiting requests that fit in the batch; when idle, wait a little so simultaneous arrivals share a prefill."""
        room = self.max_batch_size - len(self._batch.rows)
        if room <= 0 or not self._batch.mergeable:
            return []
        taken: list[GenRequest] = []
        try:
            if block:
                taken.append(self._inbox.get(timeout=0.05))
                until = time.monotonic() + self.batch_wait_s
                while len(taken) < room and (left := until - time.monotonic()) > 0:
                    taken.append(self._inbox.get(timeout=left))
            while len(taken) < room:
                taken.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        now = time.monotonic()
        live = []
        for req in taken:
            if req.expired(now):
                req.emit(DeadlineExceeded("request deadline exceeded (still queued)"))
            elif not req.cancelled:
                live.append(req)
        return live

    def _work(self) -> None:
        self._batch = DecodeBatch(self.model, self.tokenizer, self.eos_ids, self.pad_id, self.stats)
        while not self._stop.is_set():
            self._batch.prune()
            new = self._take(block=not self._batch.rows)
            self.stats.queued = self._inbox.qsize()
            try:
                self._batch.admit(new)
                self._batch.step()
            except Exception as exc:  # noqa: BLE001 - every waiting handler must hear about the failure
                for req in ({id(r.req): r.req for r in self._batch.rows} | {id(r): r for r in new}).values():
                    req.emit(exc)
                self._batch.reset()
            self.stats.running = len(self._batch.rows)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)
