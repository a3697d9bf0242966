"""Bytes a training forward keeps for its backward, per token and per decoder layer, for each checkpointing mode.

    python bench/activations.py [--model smollm2-135m-instruct] [--rows 8] [--tokens 64,256] [--precision bf16]

The source of the activation coefficients of `ppolm.plan` (docs/bench.md, "Planned against measured peaks"):
the policy is built as a PPO run builds it (dropout off, `gradient_checkpointing` applied, train mode), then one
forward of `response_hidden` (the backbone, as in `score_tokens`, without the LM head) runs with grad under the
run's autocast and weight recasting; the graph is kept alive while this process's resident memory is read.
The difference to the resident memory before the forward, over rows x tokens x layers, is what one token costs in
one layer. glibc's MALLOC_MMAP_THRESHOLD_ is pinned (65536) in the child so that freed temporaries go back to
the system and the number counts live tensors, not a heap that grew. Two token counts give the slope (the
per-token cost) without the fixed overhead of a forward. Each mode runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("false", "selective", "true")


def rss_bytes() -> int:
    """Resident memory of this process now (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(model_name: str, mode: str, rows: int, tokens: int, precision: str) -> dict:
    """Resident bytes the graph of one backbone forward holds (rows x tokens, checkpointing `mode`)."""
    sys.path.insert(0, str(ROOT))
    import gc

    import torch
    import yaml

    from ppolm.memory import enable_activation_checkpointing
    from ppolm.models import load_model
    from ppolm.models.policy import backbone_autocast, disable_dropout, response_hidden

    torch.manual_seed(0)
    model = load_model(model_name)
    disable_dropout(model)
    enable_activation_checkpointing(model, yaml.safe_load(mode))
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens))
    mask = torch.ones_like(ids)
    amp = torch.bfloat16 if precision == "bf16" else None
    gc.collect()
    before = rss_bytes()
    with backbone_autocast(model, amp, ids.device):
        hidden = response_hidden(model, ids, mask, 1)
    gc.collect()
    held = rss_bytes() - before
    del hidden
    return {"mode": mode, "tokens": tokens, "held_bytes": held, "layers": model.config.num_hidden_layers}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, model, mode, rows, tokens, precision = sys.argv
        print(json.dumps(child(model, mode, int(rows), int(tokens), precision)))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", default="64,256")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    a = ap.parse_args()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t_lo, t_hi = (int(t) for t in a.tokens.split(","))
    print(f"{a.model}, {a.rows} rows, {a.precision}: bytes kept per token per layer (slope between {t_lo} and "
          f"{t_hi} tokens)")
    for mode in MODES:
        res = []
        for t in (t_lo, t_hi):
            cmd = [sys.executable, __file__, "--child", a.model, mode, str(a.rows), str(t), a.precision]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            res.append(json.loads(done.stdout.strip().splitlines()[-1]))
        slope = (res[1]["held_bytes"] - res[0]["held_bytes"]) / (a.rows * (t_hi - t_lo) * res[0]["layers"])
        print(f"gradient_checkpointing={mode:9s} held {res[0]['held_bytes'] / 2**20:8.1f} MiB at {t_lo} tokens, "
              f"{res[1]['held_bytes'] / 2**20:8.1f} MiB at {t_hi}: {slope:8.0f} bytes/token/layer", flush=True)


if __name__ == "__main__":
    main()
