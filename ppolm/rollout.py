"""Sampling responses without grad: a KV-cached decode loop with left-padded prompts.

Own loop rather than `generate()`: it draws tokens with the inverse-CDF sampler and per-row uniforms (exact
resume, process-count invariance), stops rows at EOS or stop strings, and returns the masks PPO needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from ppolm.sampling import sample_tokens
from ppolm.types import Rollout


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: cumsum(mask) - 1, clamped at 0. (B, T) -> (B, T) long."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def truncate_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` before the first stop string; returns (text, found)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def eos_token_ids_of(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and each id of the model's
    generation_config.eos_token_id, which is a list for some models (Llama-3: <|end_of_text|>, <|eot_id|>)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(gen, "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    eos_token_ids: list[int] | None = None,  # default: eos_token_ids_of(model, tokenizer)
    autocast_dtype: torch.dtype | None = None,
    prompts: list[str] | None = None,
    samples_per_prompt: int = 1,
    all_finished: Callable[[bool], bool] | None = None,
) -> Rollout:
    """Sample up to max_new_tokens per row. prompt_ids/prompt_mask (B, P) left-padded; uniforms (N, R_max) with
    N = B x samples_per_prompt rows, the k samples of prompt b in rows [b*k, (b+1)*k); prompts: N strings.

    A row ends at its first EOS token (kept, masked in) or when its decoded text contains a stop string
    (the response keeps the token that completed it; the completion text is cut before the stop string).
    all_finished(this process's rows all ended) -> whether every process's have: decoding stops only then. With
    FSDP2-sharded weights every forward is a collective, so a process whose rows ended first must keep stepping
    (its rows stay padded and masked out) until the last process is done.
    """
    device = prompt_ids.device
    k = samples_per_prompt
    B = prompt_ids.shape[0] * k
    eos = torch.tensor(eos_token_ids or eos_token_ids_of(model, tokenizer), device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(eos[0])
    attention = prompt_mask.long()
    positions = position_ids_from_mask(attention)
    cache = DynamicCache()
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    tokens_out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask_out = torch.zeros(B, max_new_tokens, device=device)
    stop = [s for s in (stop or []) if s]
    amp = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    input_ids, steps = prompt_ids, 0
    with amp:
        for t in range(max_new_tokens):
            out = model(
                input_ids=input_ids, attention_mask=attention, position_ids=positions,
                cache=cache, use_cache=True, logits_to_keep=1,
            )
            cache = out.cache
            logits = out.logits[:, -1]
            if t == 0 and k > 1:
                # The prompt was prefilled once; its KV cache and first-token logits are shared by its k samples.
                cache.batch_repeat_interleave(k)
                logits = logits.repeat_interleave(k, dim=0)
                attention = attention.repeat_interleave(k, dim=0)
                positions = positions.repeat_interleave(k, dim=0)
            if t < min_new_tokens:
                logits = logits.float().index_fill(-1, eos, float("-inf"))
            next_tokens = sample_tokens(logits, uniforms[:, t].to(device), temperature, top_k, top_p)
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
            tokens_out[:, t] = next_tokens
            mask_out[:, t] = (~finished).float()
            hit_eos = torch.isin(next_tokens, eos) & ~finished
            ended |= hit_eos
            finished |= hit_eos
            if stop:
                for b in (~finished).nonzero().flatten().tolist():
                    text = tokenizer.decode(tokens_out[b, : t + 1], skip_special_tokens=True)
                    if truncate_at_stop(text, stop)[1]:
                        finished[b] = ended[b] = True
            steps = t + 1
            done_here = bool(finished.all())
            if all_finished(done_here) if all_finished is not None else done_here:
                break
            input_ids = next_tokens.unsqueeze(-1)
            attention = torch.cat([attention, torch.ones(B, 1, dtype=attention.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
    tokens_out, mask_out = tokens_out[:, :steps], mask_out[:, :steps]
    completions = []
    for b in range(B):
        n = int(mask_out[b].sum())
        text = tokenizer.decode(tokens_out[b, :n], skip_special_tokens=True)
        completions.append(truncate_at_stop(text, stop)[0] if stop else text)
    if k > 1:
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, dim=0), prompt_mask.repeat_interleave(k, dim=0)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.float(), response_ids=tokens_out, response_mask=mask_out,
        ended=ended, prompts=list(prompts) if prompts is not None else [""] * B, completions=completions,
    )
