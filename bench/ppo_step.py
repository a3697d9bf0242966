"""Seconds per PPO step, split by phase: ppolm's default config next to the plain-torch floor, in one run.

    python bench/ppo_step.py [--models tiny-random-llama,smollm2-135m-instruct] [--steps 3]

Batch 8 prompts, responses of exactly 24 tokens (EOS suppressed), a reward model as the reward in both.
Reports medians over --steps measured steps after one warm-up step, the update phase's achieved FLOP/s
against this machine's measured matmul peak, and last `speedup floor/ppolm = X` for the last model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from floor import FloorPPO, reward_model_from  # noqa: E402

from ppolm.config import PPORunConfig, load_config  # noqa: E402
from ppolm.data.collate import left_pad_collate  # noqa: E402
from ppolm.models import load_model, load_tokenizer  # noqa: E402
from ppolm.trainers.ppo import PPOTrainer  # noqa: E402

B, R = 8, 24


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def rm_dir(model_name: str, root: Path) -> str:
    """Save a reward model (policy backbone + random score head) so ppolm loads it like a user's RM."""
    out = root / "rm"
    if not out.exists():
        policy = load_model(model_name)
        rm = reward_model_from(policy)
        rm.save_pretrained(out)
        load_tokenizer(model_name).save_pretrained(out)
    return str(out)


def ppolm_steps(model: str, rm: str, steps: int, out_dir: Path) -> tuple[list[dict], PPOTrainer]:
    cfg = load_config(PPORunConfig, None, [
        f"model={model}", f"output_dir={out_dir}", "task.name=toy", "task.options.prompt_words=30",
        f"rollout.batch_size={B}", f"rollout.max_new_tokens={R}", f"rollout.min_new_tokens={R}",
        "ppo.minibatch_size=8", "log.progress=false", "log.tensorboard=false", f"reward.model={rm}",
        "optim.lr=1e-6", f"max_steps={steps + 1}",
    ])
    trainer = PPOTrainer(cfg)
    times = []
    for s in range(steps + 1):
        m = trainer.step(s).metrics
        if s > 0:
            times.append(m)
    return times, trainer


def floor_steps(model: str, steps: int, trainer: PPOTrainer) -> list[dict]:
    tok = load_tokenizer(model)
    policy = load_model(model)
    floor = FloorPPO(policy, tok, reward_model_from(policy), lr=1e-6)
    ids, attn = left_pad_collate([trainer.prompts.token_ids[i] for i in range(B)], tok.pad_token_id)
    torch.manual_seed(0)
    return [floor.step(ids, attn, R) for _ in range(steps + 1)][1:]


def update_flops(trainer: PPOTrainer, n_tokens: int, n_resp: int) -> float:
    """Matmul FLOPs of the update phase: 6 x body params x tokens (fwd + bwd) + 6 x H x V x response tokens
    per epoch; with the fused first forward the forward runs in the experience phase, leaving 4/6 here."""
    policy = trainer.actor.policy
    emb = policy.get_input_embeddings().weight
    body = sum(p.numel() for p in policy.parameters()) - emb.numel()
    per_epoch = 6 * body * n_tokens + 6 * emb.numel() * n_resp
    fused = trainer.fused_first_forward()
    return trainer.cfg.ppo.epochs * per_epoch - (per_epoch / 3 if fused else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-random-llama,smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"matmul peak 2048^3: fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    speedup = float("nan")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rm = rm_dir(model, Path(tmp))
            ours, trainer = ppolm_steps(model, rm, args.steps, Path(tmp) / "run")
            floor = floor_steps(model, args.steps, trainer)
        med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
        p = {"rollout": med(ours, "time/rollout_s"), "scoring": med(ours, "time/score_s"),
             "ref_values": med(ours, "time/experience_s"), "update": med(ours, "time/update_s"),
             "total": med(ours, "time/step_s")}
        f = {k: med(floor, k) for k in ["rollout", "scoring", "ref_values", "update", "total"]}
        print(f"\n== {model}: batch {B}, response {R}, medians of {args.steps} steps (s/step)")
        print(f"{'phase':12s} {'ppolm':>8s} {'floor':>8s} {'floor/ppolm':>12s}")
        for k in p:
            print(f"{k:12s} {p[k]:8.3f} {f[k]:8.3f} {f[k] / p[k]:12.2f}")
        n_tokens = B * (len(max(trainer.prompts.token_ids[:B], key=len)) + R)
        flops = update_flops(trainer, n_tokens, B * R)
        peak = peak16 if trainer.amp == torch.bfloat16 else peak32
        print(f"update phase: {flops / p['update'] / 1e9:.0f} GFLOP/s achieved = "
              f"{100 * flops / p['update'] / peak:.0f}% of the {'bf16' if peak is peak16 else 'fp32'} matmul peak")
        speedup = f["total"] / p["total"]
    print(f"speedup floor/ppolm = {speedup:.2f}")


if __name__ == "__main__":
    main()
