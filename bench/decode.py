"""Milliseconds per decode step of the embedded model (batch 8, ~61-token prompts): the rollout's own way and the
levers for it, side by side in one run.

    python bench/decode.py [--steps 24] [--compile]

Rows: the rollout's way (fp32 weights under bf16 autocast, whose cast cache makes the bf16 weights once per
rollout; DynamicCache; SDPA), eager attention instead of SDPA, a static KV cache, weights stored in bf16; with
--compile also `torch.compile` of the static-cache decode step (inductor; its compile time is printed apart).
Each row: the median over the decode steps of one rollout after a warm-up rollout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppolm.models import load_model  # noqa: E402

B, P = 8, 61


def rollout_ms(model, steps: int, *, static: bool, amp: bool, step_fn=None) -> tuple[float, float]:
    """(median ms per decode step, seconds of the first decode step) over one rollout of `steps` tokens."""
    g = torch.Generator().manual_seed(0)
    ids, tok = torch.randint(0, 49000, (B, P), generator=g), torch.randint(0, 49000, (B, 1), generator=g)
    att = torch.ones(B, P, dtype=torch.long)
    att[0, :5] = 0  # one left-padded row, as in a real batch
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast("cpu", enabled=False)
    times = []
    with torch.no_grad(), ctx:
        if static:
            cache = StaticCache(config=model.config, max_cache_len=P + steps)
            full = torch.cat([att, torch.zeros(B, steps, dtype=att.dtype)], 1)
            model(input_ids=ids, attention_mask=full, position_ids=pos, cache=cache, use_cache=True,
                  logits_to_keep=1, cache_position=torch.arange(P))
        else:
            cache = DynamicCache()
            model(input_ids=ids, attention_mask=att, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        fn = step_fn or (lambda *a: model(input_ids=a[0], attention_mask=a[1], position_ids=a[2], cache=a[3],
                                          use_cache=True, logits_to_keep=1, cache_position=a[4]).logits)
        for i in range(steps - 1):
            t = time.perf_counter()
            if static:
                full[:, P + i] = 1
                fn(tok, full, pos[:, -1:] + 1 + i, cache, torch.tensor([P + i]))
            else:
                att = torch.cat([att, torch.ones(B, 1, dtype=att.dtype)], 1)
                model(input_ids=tok, attention_mask=att, position_ids=pos[:, -1:] + 1 + i, cache=cache,
                      use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times), times[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--compile", action="store_true", help="also torch.compile the static-cache step (slow start)")
    args = ap.parse_args()
    fp32 = load_model("smollm2-135m-instruct").eval()
    bf16 = load_model("smollm2-135m-instruct").to(torch.bfloat16).eval()
    rows = [("rollout's way: fp32 weights, autocast, DynamicCache, SDPA", fp32, False, True, "sdpa"),
            ("  eager attention instead of SDPA", fp32, False, True, "eager"),
            ("  static KV cache", fp32, True, True, "sdpa"),
            ("  weights stored in bf16 (no autocast)", bf16, False, False, "sdpa"),
            ("  weights in bf16 + static KV cache", bf16, True, False, "sdpa")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, prompt {P}, {args.steps} tokens")
    for name, model, static, amp, attn in rows:
        model.set_attn_implementation(attn)
        rollout_ms(model, args.steps, static=static, amp=amp)  # warm-up
        print(f"{name:62s} {rollout_ms(model, args.steps, static=static, amp=amp)[0]:6.1f} ms/step")
    if args.compile:
        for name, model, amp in (("  compiled static step, fp32 weights under autocast", fp32, True),
                                 ("  compiled static step, weights in bf16", bf16, False)):
            model.set_attn_implementation("sdpa")

            def step(ids, mask, pos, cache, cache_pos, m=model):
                return m(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1, cache_position=cache_pos).logits

            fn = torch.compile(step, dynamic=False)
            t = time.perf_counter()
            _, first = rollout_ms(model, args.steps, static=True, amp=amp, step_fn=fn)
            warm = time.perf_counter() - t
            ms, _ = rollout_ms(model, args.steps, static=True, amp=amp, step_fn=fn)
            print(f"{name:62s} {ms:6.1f} ms/step  (first rollout {warm:.0f} s, its first step {first:.0f} s)")


if __name__ == "__main__":
    main()
