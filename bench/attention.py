"""The PPO scoring pass's forward and backward with SDPA (the default) against eager attention, embedded model.

    python bench/attention.py [--response 24] [--reps 3]

Batch 8 x (61 + R) tokens (one left-padded row), bf16 autocast, the log-probs of the last R tokens (`score_tokens`,
the fused first forward of a PPO step) and their backward; then a no-grad forward (the reference's). Medians of
--reps after one warm-up; each side measured twice, interleaved, with the peak RSS growth of its first backward.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppolm.models import load_model  # noqa: E402
from ppolm.models.policy import score_tokens  # noqa: E402


def scoring_batch(T: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The benches' scoring batch: 8 rows of T random tokens, the first row left-padded by 6 (ids, mask (8, T))."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = torch.randint(3, 49000, (8, T), generator=g), torch.ones(8, T)
    mask[0, :6] = 0
    return ids, mask


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--response", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    R, T = args.response, 61 + args.response
    model = load_model("smollm2-135m-instruct")
    ids, mask = scoring_batch(T)
    print(f"batch 8 x {T} tokens, response {R}, {torch.get_num_threads()} threads (s, medians of {args.reps})")
    for impl in ("sdpa", "eager", "sdpa", "eager"):
        model.set_attn_implementation(impl)
        fwd, bwd, ref = [], [], []
        for i in range(args.reps + 1):
            model.train()
            t0 = time.perf_counter()
            logprobs = score_tokens(model, ids, mask, ids[:, -R:], autocast_dtype=torch.bfloat16).logprobs
            t1 = time.perf_counter()
            logprobs.sum().backward()
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            model.eval()
            with torch.no_grad():
                t3 = time.perf_counter()
                score_tokens(model, ids, mask, ids[:, -R:], autocast_dtype=torch.bfloat16)
                t4 = time.perf_counter()
            if i:
                fwd.append(t1 - t0), bwd.append(t2 - t1), ref.append(t4 - t3)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{impl:6s} forward {statistics.median(fwd):.3f}  backward {statistics.median(bwd):.3f}  "
              f"no-grad forward {statistics.median(ref):.3f}  (process peak so far {peak:.2f} GiB)")


if __name__ == "__main__":
    main()
