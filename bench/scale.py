"""Peak memory per process and tokens/s of PPO on SmolLM2-135M: 1 process, 2-process DDP, FSDP2, ZeRO-2/3 (CPU).

    python bench/scale.py [--model smollm2-135m-instruct] [--steps 3] [--mmap-threshold 65536] [--layouts ddp,zero2]

Same global batch in every layout (8 prompts a step: 8 on one process, 4 on each of two), fp32, the
smollm2-ppo recipe without held-out evaluation or checkpoints. Each process runs the trainer's steps itself
and reports its peak resident memory (VmHWM, which includes the ~0.5 GB of imported libraries) and the
global tokens/s of its steps after the first; the table prints the largest peak over the processes.
Two-process layouts use the shipped accelerate configs (configs/accelerate/cpu-ddp-2.yaml, fsdp2-cpu.yaml, and
deepspeed-zero2-cpu.yaml and -zero3-cpu.yaml where deepspeed imports).

--mmap-threshold sets glibc's MALLOC_MMAP_THRESHOLD_ in every process (0: glibc's default). By default glibc
raises that threshold after the first large frees, and from then on keeps freed blocks of a few MB in its heap
instead of returning them: FSDP2 allocates and frees every block's gathered weights many times a step, so
with the default the peak RSS counts freed gather buffers, not live tensors. A fixed threshold makes large
blocks go back to the OS when freed, in every layout alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [("1 process", None, 8), ("2-process DDP", "cpu-ddp-2.yaml", 4), ("2-process FSDP2", "fsdp2-cpu.yaml", 4),
           ("2-process ZeRO-2", "deepspeed-zero2-cpu.yaml", 4),
           ("2-process ZeRO-3", "deepspeed-zero3-cpu.yaml", 4)]


def worker(out: Path, overrides: list[str]) -> None:
    """Inside each process: build the trainer, run the steps, write this rank's peak memory and tokens/s."""
    sys.path.insert(0, str(ROOT))
    from ppolm.config import PPORunConfig, load_config
    from ppolm.runtime import peak_rss_mb
    from ppolm.trainers.ppo import PPOTrainer

    steps = int(os.environ["PPOLM_BENCH_STEPS"])
    cfg = load_config(PPORunConfig, ROOT / "configs/smollm2-ppo.yaml", [
        "log.progress=false", "log.tensorboard=false", "eval.every=0", "guard.max_drop=null",
        "guard.collapse_share=null", "checkpoint.every=0", "precision=fp32",
        f"output_dir={out}", f"max_steps={steps}", *overrides])
    trainer = PPOTrainer(cfg)
    rates = [trainer.step(s).metrics["throughput/tokens_per_s"] for s in range(steps)]
    peak_mb = peak_rss_mb()  # VmHWM: a child's ru_maxrss also holds its parent's peak
    rank = trainer.runtime.rank
    (out / f"bench-rank{rank}.json").write_text(json.dumps({"peak_mb": peak_mb, "tokens_per_s": rates[1:] or rates}))


def run_layout(config: str | None, rows: int, model: str, steps: int, out: Path, mmap_threshold: int,
               extra: tuple[str, ...] = ()) -> dict:
    """Run one layout; `extra`: more config overrides (bench/plan_check.py sets gradient_checkpointing)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "PPOLM_BENCH_STEPS": str(steps),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    args = [str(Path(__file__).resolve()), "--worker", str(out), f"model={model}", f"rollout.batch_size={rows}",
            f"ppo.minibatch_size={rows}", *extra]
    if config is None:
        cmd = [sys.executable, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{config}",
               "--main_process_port", str(port), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config or '1 process'} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("bench-rank*.json"))]
    return {"peak_mb": max(r["peak_mb"] for r in ranks),
            "tokens_per_s": statistics.median(ranks[0]["tokens_per_s"]), "processes": len(ranks)}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--mmap-threshold", type=int, default=65536, help="MALLOC_MMAP_THRESHOLD_; 0: glibc default")
    ap.add_argument("--layouts", default="", help="comma-separated subset of: 1, ddp, fsdp2, zero2, zero3 (all)")
    a = ap.parse_args()
    results = {}
    print(f"{a.model}, {a.steps} steps, 8 prompts a step, fp32, MALLOC_MMAP_THRESHOLD_={a.mmap_threshold or 'default'}")
    with tempfile.TemporaryDirectory() as tmp:
        keys = dict(zip(["1", "ddp", "fsdp2", "zero2", "zero3"], [n for n, _, _ in LAYOUTS]))
        wanted = {keys[k] for k in a.layouts.split(",")} if a.layouts else set(keys.values())
        for name, config, rows in LAYOUTS:
            if name not in wanted:
                continue
            if "ZeRO" in name and importlib.util.find_spec("deepspeed") is None:
                print(f"{name:16s} skipped: deepspeed is not installed (the optional extra)")
                continue
            out = Path(tmp) / name.replace(" ", "-")
            out.mkdir()
            results[name] = run_layout(config, rows, a.model, a.steps, out, a.mmap_threshold)
            r = results[name]
            print(f"{name:16s} processes={r['processes']} peak/process={r['peak_mb']:.0f} MB "
                  f"tokens/s={r['tokens_per_s']:.1f}", flush=True)
    for name in ("FSDP2", "ZeRO-2", "ZeRO-3"):
        if f"2-process {name}" in results and "2-process DDP" in results:
            ratio = results[f"2-process {name}"]["peak_mb"] / results["2-process DDP"]["peak_mb"]
            print(f"{name} peak per process / DDP peak per process = {ratio:.2f}")


if __name__ == "__main__":
    main()
