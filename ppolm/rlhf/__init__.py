"""The RLHF flow (`ppolm run` with `flow: rlhf`): reward model, best-of-n, SFT, DPO, PPO and SFT->PPO side by side
on real text, evaluated on the same held-out prompts. See ppolm/rlhf/run.py."""
