"""Launched on 2 processes by tests/test_guard_two_ranks.py: a PPO run whose held-out check differs between
the processes. Process 0 measures a collapse (every answer one label), process 1 a balanced model. The guard
must decide on process 0's numbers on both, so both stop at the first check; a per-process decision would
leave process 1 training alone, waiting at its next collective."""

import sys

import torch.distributed as dist

from ppolm.config import PPORunConfig, load_config
from ppolm.tasks.base import Decoding, Example, Task, TaskOptions
from ppolm.trainers.ppo import PPOTrainer


class RankSkewedTask(Task):
    name = "rank-skewed"
    Options = TaskOptions
    decoding = Decoding(max_new_tokens=4, temperature=0.0)
    primary_metric = "score"

    def load(self, path):
        return [Example(f"item {i}", reference="ab"[i % 2], fields={"label": "ab"[i % 2]}, line=i + 1)
                for i in range(16)]

    def reward_functions(self):
        return [(lambda p, c, **f: [float(len(t)) for t in c], 1.0)]

    def metrics(self, examples, completions, **extra):
        return {"score": 0.5, "n": len(completions)}

    def example_scores(self, examples, completions, **extra):
        collapsed = dist.get_rank() == 0
        return [{"predicted": "a" if collapsed else ex.fields["label"]} for ex in examples]


if __name__ == "__main__":
    out = sys.argv[1]
    cfg = load_config(PPORunConfig, "configs/tiny.yaml", [
        f"output_dir={out}", "max_steps=6", "eval.every=1", "eval.at_start=false", "checkpoint.every=0",
        "guard.collapse_share=0.7", "log.progress=false", "log.tensorboard=false", "rollout.batch_size=4",
        "ppo.minibatch_size=4"])
    task = RankSkewedTask()
    PPOTrainer(cfg, task=task, eval_examples=task.load(None)).train()
