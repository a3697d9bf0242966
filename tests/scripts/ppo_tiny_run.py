"""Run tiny PPO with the given overrides (used by the multi-process and kill/resume tests)."""

import sys

from ppolm.cli import _close_process_group
from ppolm.config import PPORunConfig, load_config
from ppolm.trainers.ppo import PPOTrainer

if __name__ == "__main__":
    cfg = load_config(PPORunConfig, "configs/tiny.yaml", ["log.progress=false", "log.tensorboard=false", *sys.argv[1:]])
    try:
        PPOTrainer(cfg).train()
    finally:
        # as `ppolm` does: gloo's threads left to interpreter exit sometimes abort a finished rank (exit -6, seen
        # once in `make test` on tests/test_ppo.py::test_two_processes_equal_one_process[grpo])
        _close_process_group()
