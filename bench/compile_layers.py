"""`torch.compile` of the decoder layers for the PPO scoring-and-update pass, against eager, embedded model.

    python bench/compile_layers.py [--response 24] [--reps 3] [--precision bf16|fp32]

The pass the update runs: bf16 autocast, batch 8 x (61 + R) tokens (one left-padded row), `score_tokens`'s
log-probs of the last R tokens and their backward. Sides: eager (what ppolm runs) and each decoder layer compiled
with inductor (`layer.compile(dynamic=True)`: one compile for every sequence length, so a PPO run whose lengths
change each step compiles once); the lengths vary over the repetitions (T, T+5, T+12) as in a run. Prints the
compile time (the first pass), the medians of the passes after it, side by side and interleaved, and each side's
distance from an fp32 pass on the same batch (max |log-prob| difference, relative gradient difference of one
MLP weight): fusing changes where bf16 rounds, so compiled numbers are not eager's -- a reference model scored
eagerly would then see KL != 0 at step 0. `--precision fp32` runs both sides without autocast (what `auto` picks on a
CPU without native bf16); the distance from fp32 is then that of inductor's fp32 kernels.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/attention.py

from attention import scoring_batch  # noqa: E402  (bench/attention.py: the same batch)
from ppolm.models import load_model  # noqa: E402
from ppolm.models.policy import score_tokens  # noqa: E402


def one_pass(model, T: int, R: int, amp: torch.dtype | None) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(seconds, log-probs (8, R), gradient of layer 3's down_proj) of one forward + backward."""
    ids, mask = scoring_batch(T, seed=T)
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    logprobs = score_tokens(model, ids, mask, ids[:, -R:], autocast_dtype=amp).logprobs
    logprobs.sum().backward()
    secs = time.perf_counter() - t0
    return secs, logprobs.detach(), model.model.layers[3].mlp.down_proj.weight.grad.clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--response", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = ap.parse_args()
    amp = torch.bfloat16 if args.precision == "bf16" else None
    R, T = args.response, 61 + args.response
    eager = load_model("smollm2-135m-instruct")
    eager.train()
    compiled = copy.deepcopy(eager)
    for layer in compiled.model.layers:
        layer.compile(dynamic=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 8, response {R}, {args.precision}")
    t0 = time.perf_counter()
    one_pass(compiled, T, R, amp)
    print(f"compiled: first pass (compiles) {time.perf_counter() - t0:.1f} s")
    one_pass(eager, T, R, amp)  # warm-up
    lengths = [T, T + 5, T + 12] * args.reps
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i, t in enumerate(lengths):
        for name in (("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")):
            times[name].append(one_pass(eager if name == "eager" else compiled, t, R, amp)[0])
    for name, ts in times.items():
        print(f"{name:8s} forward+backward median {statistics.median(ts):.3f} s  ({', '.join(f'{x:.2f}' for x in ts)})")
    print(f"eager / compiled: {statistics.median(times['eager']) / statistics.median(times['compiled']):.2f}x")
    _, lp32, g32 = one_pass(eager, T, R, None)
    for name, model in (("eager", eager), ("compiled", compiled)):
        _, lp, g = one_pass(model, T, R, amp)
        print(f"{name:8s} vs fp32: max |log-prob diff| {float((lp - lp32).abs().max()):.3f} nats, "
              f"gradient rel diff {float((g - g32).norm() / g32.norm()):.3f}")


if __name__ == "__main__":
    main()
