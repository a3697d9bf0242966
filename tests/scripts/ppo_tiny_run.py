"""Run tiny PPO with the given overrides (used by the multi-process and kill/resume tests)."""

import sys

from ppolm.config import PPORunConfig, load_config
from ppolm.trainers.ppo import PPOTrainer

if __name__ == "__main__":
    cfg = load_config(PPORunConfig, "configs/tiny.yaml", ["log.progress=false", "log.tensorboard=false", *sys.argv[1:]])
    PPOTrainer(cfg).train()
