"""Seconds per PPO step, split by phase: ppolm's default config next to the plain-torch floor, in one run.

    python bench/ppo_step.py [--models tiny-random-llama,smollm2-135m-instruct] [--steps 3] [--responses 24,96,256]
                             [--sides ppolm,floor,floor-bf16] [--set KEY=VALUE ...]

Batch 8 prompts, responses of exactly R tokens (EOS suppressed), a reward model (sequence-classification head on
the policy's backbone) as the reward on every side, one PPO epoch of one minibatch; at step s every side gets the
same 8 prompts (the ones ppolm's seeded order gives step s). Sides (`SIDES`):
- ppolm: the default config (value head on the policy, fused first forward, bf16 autocast);
- ppolm-separate: ppolm with the floor's design: `critic.kind=separate` (its own backbone + value head) and
  `ppo.fuse_first_forward=false` (a no-grad forward for the old log-probs and values);
- ppolm-lora: the LoRA fast path (opt-in: adapters only, not the floor's work, reported apart);
- floor, floor-bf16: `bench/floor.py` (what a competent plain implementation does: separate value model, a no-grad
  forward for the old log-probs), fp32 and under bf16 autocast;
- floor-vh, floor-vh-bf16: the floor with ppolm's design (a value head on the policy, the fused first forward).
The like-for-like pairs (`PAIRS`) then split ppolm's lead: floor-vh-bf16/ppolm and floor-bf16/ppolm-separate are
the same design in two implementations; floor-bf16/floor-vh-bf16 and ppolm-separate/ppolm are one implementation
with two designs. Each side runs in its own process, one after the other, so its peak RSS is its own. Reports
medians over --steps measured steps after one warm-up step, the update phase's achieved FLOP/s against this
machine's matmul peak, s/step at every response length with its growth against linear, the pairs' ratios, and
last `speedup floor/ppolm = X` (fp32 floor, first response length, last model). --set passes config overrides to
the ppolm sides (to measure one lever: e.g. `--set gradient_checkpointing=false`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

B = 8
PHASES = ["rollout", "scoring", "ref_values", "update", "total"]
SIDES = ("ppolm", "ppolm-separate", "ppolm-lora", "floor", "floor-bf16", "floor-vh", "floor-vh-bf16")
# config overrides that make each ppolm side (before --set)
PPOLM_SIDES = {
    "ppolm": (),
    "ppolm-separate": ("critic.kind=separate", "ppo.fuse_first_forward=false"),
    "ppolm-lora": ("lora.enabled=true", "optim.lr=1e-4"),
}
# (numerator side, denominator side, what the ratio of their s/step isolates)
PAIRS = [
    ("floor-vh-bf16", "ppolm", "implementation, ppolm's design (value head, fused first forward, bf16)"),
    ("floor-bf16", "ppolm-separate", "implementation, the floor's design (separate critic, no-grad forward, bf16)"),
    ("floor-bf16", "floor-vh-bf16", "design, in the floor (bf16)"),
    ("floor", "floor-vh", "design, in the floor (fp32)"),
    ("ppolm-separate", "ppolm", "design, in ppolm"),
]


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
    from floor import reward_model_from

    from ppolm.models import load_model, load_tokenizer

    out = root / "rm"
    if not out.exists():
        torch.manual_seed(0)  # the score head's draw: the same reward model in every run of the bench
        rm = reward_model_from(load_model(model_name))
        rm.save_pretrained(out)
        load_tokenizer(model_name).save_pretrained(out)
    return str(out)


def ppolm_trainer_overrides(model: str, rm: str, steps: int, R: int, out_dir: Path) -> list[str]:
    """The config overrides of a ppolm side (before its own and --set's): also what bench/plan_check.py plans."""
    return [
        f"model={model}", f"output_dir={out_dir}", "task.name=toy", "task.options.prompt_words=30",
        f"rollout.batch_size={B}", f"rollout.max_new_tokens={R}", f"rollout.min_new_tokens={R}",
        "ppo.minibatch_size=8", "log.progress=false", "log.tensorboard=false", f"reward.model={rm}",
        "optim.lr=1e-6", f"max_steps={2 * steps + 3}", "checkpoint.every=0",
    ]


def ppolm_trainer(model: str, rm: str, steps: int, R: int, out_dir: Path, extra: tuple[str, ...] = ()):
    from ppolm.config import PPORunConfig, load_config
    from ppolm.trainers.ppo import PPOTrainer

    cfg = load_config(PPORunConfig, None, [*ppolm_trainer_overrides(model, rm, steps, R, out_dir), *extra])
    return PPOTrainer(cfg)


def step_prompts(trainer, step: int) -> list[list[int]]:
    """The token ids of the prompts ppolm's rollout takes at `step` (0-based): every side is given these."""
    from ppolm.trainers.prompts import step_rows

    rows = step_rows(len(trainer.prompts.examples), trainer.cfg.seed, step, trainer.global_batch,
                     trainer.runtime.rank, trainer.cfg.rollout.batch_size)
    return [trainer.prompts.token_ids[i] for _, i in rows]


def update_flops(trainer, n_tokens: int, n_resp: int) -> float:
    """Matmul FLOPs of the update phase: 6 x body params x tokens (fwd + bwd) + 6 x H x V x response tokens
    per epoch; with the fused first forward the forward runs in the experience phase, leaving 4/6 here."""
    policy = trainer.actor.policy
    emb = policy.get_input_embeddings().weight
    body = sum(p.numel() for p in policy.parameters()) - emb.numel()
    per_epoch = 6 * body * n_tokens + 6 * emb.numel() * n_resp
    fused = trainer.fused_first_forward()
    return trainer.cfg.ppo.epochs * per_epoch - (per_epoch / 3 if fused else 0.0)


def child(side: str, model: str, steps: int, R: int, rm: str, overrides: tuple[str, ...] = (),
          profiled: bool = False) -> dict:
    """One side's medians (s/step by phase), its peak RSS and, for ppolm, the update phase's FLOPs; with
    `profiled`, a ppolm side runs one more step under torch.profiler, its time grouped (bench/profile_groups.py)."""
    from ppolm.data.collate import left_pad_collate
    from ppolm.models import load_model, load_tokenizer
    from ppolm.runtime import peak_rss_mb  # VmHWM: a child's ru_maxrss also holds its parent's peak

    torch.manual_seed(0)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        extra = PPOLM_SIDES.get(side, ()) + overrides
        trainer = ppolm_trainer(model, rm, steps, R, Path(tmp) / "run", extra)
        prompts = [step_prompts(trainer, s) for s in range(steps + 1)]
        if side in PPOLM_SIDES:
            rows = [trainer.step(s).metrics for s in range(steps + 1)][1:]
            keys = {"rollout": "time/rollout_s", "scoring": "time/score_s", "ref_values": "time/experience_s",
                    "update": "time/update_s", "total": "time/step_s"}
            out = {k: statistics.median(r[v] for r in rows) for k, v in keys.items()}
            n_tokens = statistics.median(B * (len(max(p, key=len)) + R) for p in prompts[1:])
            out["update_flops"] = update_flops(trainer, n_tokens, B * R)
            out["bf16"] = trainer.amp == torch.bfloat16
            if profiled:  # after the timed steps, so the profiler's overhead touches none of them
                from profile_groups import median_groups, profile

                # the peak of the measured steps: the profiler's own records added ~2 GiB (4.51 -> 6.57 GiB, fp32)
                out["peak_rss_gib"] = peak_rss_mb() / 1024
                # the groups from steps profiled without input shapes (as the first, 2026-12-03 figure was:
                # recording shapes inflates the small ops), as many steps as were timed (one profiled step is one
                # sample: two runs of the same build read 2.50 and 3.40 s of non-matmul on one machine), medians;
                # the largest ops by shape from one more step
                runs = [profile(lambda s=s: trainer.step(s), shapes=False) for s in range(steps + 1, 2 * steps + 1)]
                out["profile"] = median_groups(runs)
                out["profile"]["top"] = profile(lambda: trainer.step(2 * steps + 1))["top"]
        else:
            from floor import FloorPPO

            del trainer  # the floor process holds only the floor's models
            tok, policy = load_tokenizer(model), load_model(model)
            floor = FloorPPO(policy, tok, load_model(rm, kind="seqcls"), lr=1e-6, bf16=side.endswith("-bf16"),
                             value_head=side.startswith("floor-vh"), fused_first_forward=side.startswith("floor-vh"))
            batches = [left_pad_collate(p, tok.pad_token_id) for p in prompts]
            rows = [floor.step(ids, attn, R) for ids, attn in batches][1:]
            out = {k: statistics.median(r[k] for r in rows) for k in PHASES}
    out.setdefault("peak_rss_gib", peak_rss_mb() / 1024)
    return out


def run_side(side: str, model: str, steps: int, R: int, rm: str, overrides: list[str],
             profiled: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", side, "--models", model, "--steps", str(steps),
           "--responses", str(R), "--rm", rm, *(a for o in overrides for a in ("--set", o)),
           *(["--profile"] if profiled else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-random-llama,smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--responses", default="24", help="response lengths, e.g. 24,96,256")
    ap.add_argument("--sides", default="ppolm,floor,floor-bf16",
                    help="any of " + ", ".join(SIDES) + " (ppolm-lora: LoRA adapters against a full-rank floor)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the ppolm sides (repeatable)")
    ap.add_argument("--profile", action="store_true",
                    help="ppolm sides: one more step under torch.profiler, its time by kind of work")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rm", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in args.responses.split(",")]
    if args.child:
        print(json.dumps(child(args.child, args.models, args.steps, lengths[0], args.rm, tuple(args.set),
                               args.profile)))
        return
    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"--sides: unknown {unknown}; choose from {', '.join(SIDES)}")
    from ppolm.runtime import autocast_dtype

    # Without AVX512-BF16/AMX, bf16 matmuls are emulated (under 1 GFLOP/s on an AVX2 EPYC: minutes for this
    # measurement alone); ppolm's 'auto' then runs fp32 and a bf16 side stands for no machine that would use bf16.
    native_bf16 = autocast_dtype("auto", torch.device("cpu")) is not None
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16) if native_bf16 else float("nan")
    if args.set:
        print("ppolm sides with: " + " ".join(args.set))
    bf16_peak = f"{peak16 / 1e9:.0f} GFLOP/s" if native_bf16 else "not native on this CPU (emulated; not measured)"
    print(f"matmul peak 2048^3: fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {bf16_peak} ({torch.get_num_threads()} threads)")
    if not native_bf16 and any("bf16" in side for side in sides):
        print("warning: this CPU has no native bf16: the bf16 sides run emulated matmuls and say nothing of a bf16 CPU")
    speedup = float("nan")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            rm = rm_dir(model, Path(tmp))
            by_len = {R: {side: run_side(side, model, args.steps, R, rm, args.set, args.profile) for side in sides}
                      for R in lengths}
        for R, res in by_len.items():
            print(f"\n== {model}: batch {B}, response {R}, medians of {args.steps} steps (s/step)")
            print(f"{'phase':12s}" + "".join(f" {s:>11s}" for s in sides)
                  + "".join(f" {s + '/ppolm':>17s}" for s in sides if s != "ppolm" and "ppolm" in res))
            for k in PHASES:
                base = res.get("ppolm", {}).get(k)
                print(f"{k:12s}" + "".join(f" {res[s][k]:11.3f}" for s in sides)
                      + "".join(f" {res[s][k] / base:17.2f}" for s in sides if s != "ppolm" and base))
            print("peak RSS GiB" + "".join(f" {res[s]['peak_rss_gib']:11.2f}" for s in sides))
            pairs = [(a, b) for a, b, _ in PAIRS if a in res and b in res]
            if pairs:
                print("like-for-like pairs (ratio of s/step; > 1: the second side is faster)")
                print(f"{'phase':12s}" + "".join(f" {a + '/' + b:>29s}" for a, b in pairs))
                for k in PHASES:
                    print(f"{k:12s}" + "".join(f" {res[a][k] / res[b][k]:29.2f}" for a, b in pairs))
            for s in sides:
                if "profile" in res[s]:
                    from profile_groups import line, top_lines

                    print(f"{s}: {line(res[s]['profile'])}")
                    # the profiler's own cost lands in the small ops; the timed step minus the matmul is the other
                    # reading (the profiled matmul seconds are close to their unprofiled ones: few, long calls)
                    print(f"{s}: timed step {res[s]['total']:.2f} s - profiled matmul {res[s]['profile']['matmul']:.2f}"
                          f" s = non-matmul {res[s]['total'] - res[s]['profile']['matmul']:.2f} s")
                    print("\n".join(["largest ops of the profiled step (self time, by input shapes):",
                                     *top_lines(res[s]["profile"])]))
            if "ppolm" in res:  # (ppolm-lora computes no weight gradients: its FLOPs are not these)
                p = res["ppolm"]
                peak = peak16 if p["bf16"] else peak32
                print(f"update phase: {p['update_flops'] / p['update'] / 1e9:.0f} GFLOP/s achieved = "
                      f"{100 * p['update_flops'] / p['update'] / peak:.0f}% of the "
                      f"{'bf16' if p['bf16'] else 'fp32'} matmul peak")
        if len(lengths) > 1:
            r0 = lengths[0]
            print(f"\ncost growth vs response {r0} (linear in R would be R/{r0}):")
            for R in lengths[1:]:
                print(f"response {R:4d} (x{R / r0:.1f}):" + "".join(
                    f" {s} x{by_len[R][s]['total'] / by_len[r0][s]['total']:.2f}" for s in sides))
        first = by_len[lengths[0]]
        for a, b, what in PAIRS:
            if a in first and b in first:
                print(f"pair {a}/{b} = {first[a]['total'] / first[b]['total']:.2f} ({what})")
        if "ppolm" in first and "floor-bf16" in first:
            print(f"speedup bf16-floor/ppolm = {first['floor-bf16']['total'] / first['ppolm']['total']:.2f}")
        if "ppolm-lora" in first and "floor" in first:
            print(f"speedup floor/ppolm-lora = {first['floor']['total'] / first['ppolm-lora']['total']:.2f} "
                  "(LoRA against a full fine-tuning floor: not the same work)")
        if "ppolm" in first and "floor" in first:
            speedup = first["floor"]["total"] / first["ppolm"]["total"]
    print(f"speedup floor/ppolm = {speedup:.2f}")


if __name__ == "__main__":
    main()
