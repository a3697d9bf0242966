"""The running decode batch of the server: iteration-level (continuous) batching over one shared KV cache.

Each engine iteration (1) drops rows whose client left or whose deadline passed, (2) admits waiting requests:
their prompts are prefilled together, their first token sampled and streamed at once, and their KV cache is
merged into the running one, (3) runs one decode step for every row. So a new request joins at the next step
instead of waiting for the whole batch, and a finished row leaves at once (Orca, Yu et al. 2022).

Rows are left-padded to a common width: the cache of the running rows and that of the new rows are padded with
masked-out zeros to the same length and concatenated on the batch dimension; RoPE is applied before keys are
cached, and position ids come from each row's own count, so a row's tokens do not depend on its neighbours.
Columns no live row attends to any more are trimmed after rows leave. Only transformers' dynamic cache layers
can be merged this way; for other cache types the engine admits new rows only when the batch is empty.
"""

from __future__ import annotations

import secrets
import time

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from ppolm.sampling import sample_tokens
from ppolm.serve.request import GREEDY_BELOW, DeadlineExceeded, EngineStats, Finish, GenRequest


class Row:
    """Text state of one row: generated ids, what has been streamed, and stop-string handling."""

    def __init__(self, req: GenRequest, tokenizer: PreTrainedTokenizerBase) -> None:
        self.req = req
        self.tok = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded completion already emitted
        # A stop string may straddle tokens, so this many trailing characters stay unsent until they cannot
        # be the start of a stop string any more.
        self.hold = max((len(s) for s in req.params.stop), default=1) - 1
        seed = req.params.seed if req.params.seed is not None else secrets.randbits(63)
        self.gen = torch.Generator()  # CPU: each row draws its own uniforms, whatever the device
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


def sample_next(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """Next token per row from `logits` (B, V) with the project's inverse-CDF sampler (ppolm.sampling).

    Rows are grouped by (temperature, top_k, top_p) so each group is one vectorized call; every row's uniform
    comes from its own generator, so a row samples the same tokens alone or batched with any neighbours.
    """
    groups: dict[tuple[float, int, float], list[int]] = {}
    for i, row in enumerate(rows):
        p = row.req.params
        temperature = 0.0 if p.temperature < GREEDY_BELOW else p.temperature
        groups.setdefault((temperature, p.top_k, p.top_p), []).append(i)
    out = [0] * len(rows)
    for (temperature, top_k, top_p), idx in groups.items():
        uniforms = torch.stack([torch.rand((), generator=rows[i].gen) for i in idx]).to(logits.device)
        picked = sample_tokens(logits[idx], uniforms, temperature=temperature, top_k=top_k, top_p=top_p)
        for i, token in zip(idx, picked.tolist(), strict=True):
            out[i] = int(token)
    return out


class DecodeBatch:
    """The rows decoding together, their shared KV cache and the token each feeds next.

    State between steps: `pending` (B,) the last sampled tokens, `mask` (B, W) the attention mask including the
    pending column, `positions` (B, 1) the pending tokens' positions; the cache holds W - 1 columns. The pending
    column must be in the mask before its token is fed: the forward appends that token's key to the cache and
    its query attends to it, so a mask one column short hides each new token from itself and every later step
    samples from a distribution other than the model's (what a plain forward over the sequence gives).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        pad_id: int,
        stats: EngineStats,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.stats = stats
        self.device = next(model.parameters()).device
        self.reset()

    def reset(self) -> None:
        """Forget every row (after an error every waiting handler has already been told)."""
        self.rows: list[Row] = []
        self.cache = None
        self.pending = torch.empty(0, dtype=torch.long)
        self.mask = torch.empty(0, 0, dtype=torch.long)
        self.positions = torch.empty(0, 1, dtype=torch.long)

    @property
    def mergeable(self) -> bool:
        """Whether new rows can join now: the batch is empty or its cache is made of plain dynamic layers."""
        if not self.rows or self.cache is None:
            return True
        return all(type(layer) is DynamicLayer for layer in getattr(self.cache, "layers", [None]))

    def prune(self, now: float | None = None) -> None:
        """Drop rows whose client went away (silently) or whose deadline passed (they hear DeadlineExceeded)."""
        now = time.monotonic() if now is None else now
        keep = []
        for i, row in enumerate(self.rows):
            if row.req.expired(now):
                row.req.emit(DeadlineExceeded("request deadline exceeded"))
            elif not row.req.cancelled:
                keep.append(i)
        self._select(keep)

    @torch.inference_mode()
    def admit(self, reqs: list[GenRequest]) -> None:
        """Prefill `reqs` together, sample and stream their first token, and merge the live ones into the batch."""
        if not reqs:
            return
        rows = [Row(r, self.tokenizer) for r in reqs]
        width = max(len(r.prompt_ids) for r in reqs)
        input_ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            # Masks come from prompt lengths, never from pad ids (pad == eos on some tokenizers).
            input_ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, width - len(r.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        self.stats.batches += 1
        self.stats.rows += len(reqs)
        tokens = sample_next(out.logits[:, -1, :].float(), rows)
        keep = self._push(rows, tokens)
        if not keep:
            return
        mask = torch.cat([mask, mask.new_ones((len(reqs), 1))], dim=1)  # the pending (first sampled) token
        new = _Part(out.cache, mask, positions[:, -1:] + 1, torch.tensor(tokens, device=self.device))
        new.select(keep, len(rows))
        rows = [rows[i] for i in keep]
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.pending = rows, new.cache, new.mask, \
                new.positions, new.pending
        else:
            self._merge(new)
            self.rows += rows
        self.stats.max_batch_rows = max(self.stats.max_batch_rows, len(self.rows))

    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every row: feed the pending tokens, sample, stream, drop the finished rows."""
        if not self.rows:
            return
        out = self.model(input_ids=self.pending[:, None], attention_mask=self.mask, position_ids=self.positions,
                         cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.stats.steps += 1
        tokens = sample_next(out.logits[:, -1, :].float(), self.rows)
        keep = self._push(self.rows, tokens)
        self.pending = torch.tensor(tokens, device=self.device)
        # The column of the token just sampled, which the next step feeds (the cache now holds W columns).
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.positions = self.positions + 1
        self._select(keep)

    def _push(self, rows: list[Row], tokens: list[int]) -> list[int]:
        done = [row.req.cancelled or row.push(t, t in self.eos_ids) for row, t in zip(rows, tokens, strict=True)]
        self.stats.tokens += len(rows)
        return [i for i, d in enumerate(done) if not d]

    def _select(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.reset()
            return
        part = _Part(self.cache, self.mask, self.positions, self.pending)
        part.select(keep, len(self.rows))
        self.rows = [self.rows[i] for i in keep]
        self.cache, self.mask, self.positions, self.pending = part.cache, part.mask, part.positions, part.pending

    def _merge(self, new: _Part) -> None:
        width = max(self.mask.shape[1], new.mask.shape[1])
        old_pad, new_pad = width - self.mask.shape[1], width - new.mask.shape[1]
        for old_layer, new_layer in zip(self.cache.layers, new.cache.layers, strict=True):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, old_pad), _left_pad(new_layer.keys, new_pad)])
            old_layer.values = torch.cat([_left_pad(old_layer.values, old_pad), _left_pad(new_layer.values, new_pad)])
        self.mask = torch.cat([F.pad(self.mask, (old_pad, 0)), F.pad(new.mask, (new_pad, 0))])
        self.positions = torch.cat([self.positions, new.positions])
        self.pending = torch.cat([self.pending, new.pending])


class _Part:
    """Cache, mask, positions and pending tokens of some rows, with row selection and dead-column trimming."""

    def __init__(self, cache, mask: torch.Tensor, positions: torch.Tensor, pending: torch.Tensor) -> None:
        self.cache, self.mask, self.positions, self.pending = cache, mask, positions, pending

    def select(self, keep: list[int], n: int) -> None:
        if len(keep) < n:
            sel = torch.tensor(keep, device=self.mask.device)
            self.cache.batch_select_indices(sel)
            self.mask, self.positions, self.pending = self.mask[sel], self.positions[sel], self.pending[sel]
        # Leading columns that no remaining row attends to are padding for rows that left: drop them.
        live = self.mask.any(dim=0).nonzero()
        start = int(live[0]) if len(live) else 0
        if start > 0 and all(type(layer) is DynamicLayer for layer in getattr(self.cache, "layers", [None])):
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
            self.mask = self.mask[:, start:]


def _left_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, n + T, D) with zeros in front (masked out, so their values never matter)."""
    return F.pad(x, (0, 0, n, 0)) if n else x
