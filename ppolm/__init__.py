"""ppolm: PPO fine-tuning for language models, from theory to practice."""

from __future__ import annotations

__version__ = "0.1.0"


def train_ppo(config, reward_fn=None):
    """Run PPO (see ppolm.trainers.ppo.train_ppo); imported lazily so `import ppolm` stays light."""
    from ppolm.trainers.ppo import train_ppo as _train

    return _train(config, reward_fn=reward_fn)


__all__ = ["__version__", "train_ppo"]
