"""Evaluation of the RLHF flow's methods on the same held-out prompts.

Every model samples at temperature 1 (what PPO optimizes, and what the KL and best-of-n's KL are defined for);
sample j of prompt i draws from the stream (seed, j, i) for every model, so the methods share their random
numbers. Each completion is scored by the reward model (the chat-templated prompt + completion, the text it was
trained on), by the independent judge, and by the base model (its NLL of the completion, for perplexity, and
KL(pi || pi_base) summed along the sampled path, ppolm.eval.run.sequence_kl_and_nll). Best-of-n is n samples
of the base model, the one the reward model scores highest kept; its KL is the analytic log n - (n-1)/n.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ppolm.data.collate import apply_chat_template
from ppolm.eval.judge import judge_compound
from ppolm.eval.rlhf_metrics import best_of_n_index, best_of_n_kl, method_metrics
from ppolm.eval.run import complete
from ppolm.tasks.base import Decoding


@dataclass
class Samples:
    """n completions for each of P prompts: texts (P lists of n), and (P, n) float tensors: rm (reward-model
    score), judge (VADER compound), kl (to the base model along the path), nll (base model's summed NLL of the
    completion), tokens (completion tokens)."""

    texts: list[list[str]]
    rm: torch.Tensor
    judge: torch.Tensor
    kl: torch.Tensor
    nll: torch.Tensor
    tokens: torch.Tensor
    seconds: float = 0.0

    def pick(self, index: torch.Tensor) -> "Samples":
        """One completion per prompt, index (P,) into the n samples."""
        rows = torch.arange(len(self.texts))
        return Samples([[t[int(j)]] for t, j in zip(self.texts, index)], *(
            x[rows, index][:, None] for x in (self.rm, self.judge, self.kl, self.nll, self.tokens)), self.seconds)

    def first(self, n: int) -> "Samples":
        """The first n samples of every prompt."""
        return Samples([t[:n] for t in self.texts], *(x[:, :n] for x in (self.rm, self.judge, self.kl, self.nll,
                                                                            self.tokens)), self.seconds)


def metrics_of(s: Samples, kl_constant: float | None = None) -> dict:
    """method_metrics of the first sample of every prompt; kl_constant replaces the measured KL (best-of-n)."""
    kls = [kl_constant] * len(s.texts) if kl_constant is not None else s.kl[:, 0].tolist()
    m = method_metrics([t[0] for t in s.texts], s.rm[:, 0].tolist(), s.judge[:, 0].tolist(), kls,
                       s.nll[:, 0], s.tokens[:, 0])
    if kl_constant is not None:
        m["kl_se"] = None  # an analytic value, not a measurement
    return m


def best_of_n(s: Samples, n: int) -> tuple[Samples, dict]:
    """Best-of-n from the first n samples: the chosen samples and their metrics (KL = best_of_n_kl(n))."""
    picked = s.first(n).pick(best_of_n_index(s.rm[:, :n]))
    return picked, metrics_of(picked, kl_constant=best_of_n_kl(n))


class FlowEvaluator:
    """Holds the base model, the reward model and the tokenized test prompts; `sample` evaluates one model."""

    def __init__(self, base: str, rm_dir: str, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                 seed: int, autocast: torch.dtype | None):
        from ppolm.models import load_model, load_tokenizer
        from ppolm.runtime import local_device

        self.device = local_device()
        self.tokenizer = load_tokenizer(base)
        self.base = self._frozen(load_model(base))
        self.rm = self._frozen(load_model(rm_dir, kind="seqcls"))
        self.rm_tokenizer = load_tokenizer(rm_dir)
        self.texts = [apply_chat_template(self.tokenizer, p, None) for p in prompts]
        self.ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in self.texts]
        self.decoding = Decoding(max_new_tokens=max_new_tokens, temperature=1.0)
        self.batch_size, self.seed, self.autocast = batch_size, seed, autocast

    def _frozen(self, model):
        model.requires_grad_(False)
        model.eval()
        return model.to(self.device)

    def sample(self, model_dir: str | None, n: int = 1) -> Samples:
        """n samples per prompt from model_dir (None: the base model, then KL = 0 and the NLL is its own)."""
        from ppolm.models import load_model
        from ppolm.rewards.compose import reward_model_scores

        t0 = time.perf_counter()
        model = self.base if model_dir is None else self._frozen(load_model(model_dir))
        cols = []
        for j in range(n):
            # seed * 1000 + j: sample j's stream; the same for every model, so methods share random numbers
            out = complete(model, self.tokenizer, self.ids, self.decoding, batch_size=self.batch_size,
                           autocast=self.autocast, seed=self.seed * 1000 + j, reference_scores=True,
                           reference_model=None if model_dir is None else self.base)
            rm = torch.cat([reward_model_scores(self.rm, self.rm_tokenizer,
                                                [p + c for p, c in zip(self.texts[k: k + self.batch_size],
                                                                       out.texts[k: k + self.batch_size])],
                                                self.autocast).cpu()
                            for k in range(0, len(out.texts), self.batch_size)])
            cols.append((out.texts, rm, torch.tensor(judge_compound(out.texts)), torch.tensor(out.kls),
                         torch.tensor(out.ref_nll), torch.tensor(out.ref_tokens, dtype=torch.float32)))
        texts = [[c[0][i] for c in cols] for i in range(len(self.ids))]
        stacked = [torch.stack([c[k] for c in cols], dim=1).float() for k in range(1, 6)]
        if model is not self.base:
            del model
        return Samples(texts, *stacked, seconds=time.perf_counter() - t0)
