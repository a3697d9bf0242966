"""ppolm: PPO fine-tuning for language models, from theory to practice."""

from __future__ import annotations

import logging

__version__ = "0.1.0"


class _ThirdPartyNoise(logging.Filter):
    """Drops two start-up warnings that say nothing to a ppolm user: torchao (the int8 export extra) failing to
    load its CUDA-only kernels on a CPU machine, and torch noting that torchao registers Enums with pytree."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Failed to load") and ".so" in record.getMessage()
                    or "is an Enum subclass and is now natively supported" in msg)


logging.getLogger("torchao").addFilter(_ThirdPartyNoise())
logging.getLogger("torch.utils._pytree").addFilter(_ThirdPartyNoise())


def train_ppo(config, reward_fn=None):
    """Run PPO (see ppolm.trainers.ppo.train_ppo); imported lazily so `import ppolm` stays light."""
    from ppolm.trainers.ppo import train_ppo as _train

    return _train(config, reward_fn=reward_fn)


__all__ = ["__version__", "train_ppo"]
