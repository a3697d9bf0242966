"""`ppolm.cli` with a NaN gradient on process 0 only, at the backward passes given by NAN_CALLS (comma-separated
0-based indices): launched by `accelerate launch tests/scripts/nan_rank0_cli.py ppo ...` to check that a
non-finite gradient on one process skips the step on every process (DDP, DeepSpeed ZeRO)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nan_inject import NaNGradients, target_param  # noqa: E402

from ppolm import cli  # noqa: E402
from ppolm.trainers import ppo  # noqa: E402

build = ppo.build_actor_critic


def poisoned_build(cfg, amp):
    actor, reference = build(cfg, amp)
    if int(os.environ.get("RANK", "0")) == 0:
        NaNGradients(target_param(actor), {int(c) for c in os.environ["NAN_CALLS"].split(",")})
    return actor, reference


ppo.build_actor_critic = poisoned_build
sys.exit(cli.main(sys.argv[1:]))
