"""Small masked tensor operations shared by every layer.

Shapes: B batch, R response length, V vocabulary. A mask is 1.0 for real tokens and 0.0 for padding.
All functions are pure and run in whatever dtype they are given; callers pass fp32 for the maths.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over `dim` (all dims when None)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / max(sum(mask), 1): a mask with no ones gives 0, never NaN."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of x (Bessel-corrected when unbiased and more than one entry)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over masked entries; padding positions are returned as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


# Rows that the full-vocabulary reductions below take at once. Their (rows, V) fp32 temporaries are then 3 MB (16
# rows of a 49,152 vocabulary), reused from the heap and cache-resident, where one over a PPO step's 192 positions
# is 38 MB, and on CPU a fresh block of that size is page-faulted in at each use (docs/bench.md). A row's value does
# not depend on the split: the results are bitwise those of one pass (tests/test_algo.py).
REDUCE_ROWS = 16


def _row_chunks(z: torch.Tensor) -> list[torch.Tensor]:
    """z (..., V) as (N, V) row blocks of at most REDUCE_ROWS rows (one block when N is small or 0)."""
    flat = z.reshape(-1, z.shape[-1])
    return list(flat.split(REDUCE_ROWS)) if flat.shape[0] > REDUCE_ROWS else [flat]


def logsumexp_rows(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, REDUCE_ROWS rows at a time: z (..., V) -> (...)."""
    return torch.cat([torch.logsumexp(c, dim=-1) for c in _row_chunks(z)]).reshape(z.shape[:-1])


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position. logits (B, R, V), labels (B, R) -> (B, R), computed in fp32."""
    logits = logits.float()
    # gather then subtract logsumexp: avoids materializing a second (B, R, V) tensor of log-probs.
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - logsumexp_rows(logits)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) * z per position. logits (B, R, V) -> (B, R), fp32."""
    logits = logits.float()
    rows = [torch.logsumexp(c, dim=-1) - (torch.softmax(c, dim=-1) * c).sum(-1) for c in _row_chunks(logits)]
    return torch.cat(rows).reshape(logits.shape[:-1])


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    With log r = ref_logprobs - logprobs:
    - k1 = -log r (unbiased, can be negative per token),
    - k2 = (log r)^2 / 2,
    - k3 = (r - 1) - log r (unbiased, always >= 0, lower variance).
    Shapes (B, R) -> (B, R).
    """
    log_ratio = ref_logprobs.float() - logprobs.float()
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        # clamp keeps exp() finite on tokens the reference finds impossible; k3 is then large but not inf.
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}' (allowed: k1, k2, k3)")


class _LogprobsEntropy(torch.autograd.Function):
    """log softmax(z)[label] and the entropy of softmax(z) from one pass over the (N, V) logits, with a backward
    that reuses the saved probabilities: grad_z = g_lp * (onehot(label) - p) - g_H * p * (log p + H).

    Why not autograd over logsumexp and softmax: that path runs logsumexp twice in the forward (once for the
    log-probs, once for the entropy), and its backward recomputes exp(z - lse) into fresh full-vocabulary tensors;
    each such (N, V) fp32 temporary is 38 MB at a PPO step's 192 positions, and on CPU a fresh block of that size
    is page-faulted in on every use. Here: one softmax kept for the backward (what logsumexp's autograd keeps
    anyway, the logits) and one (N, V) gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, entropy_grad: bool):
        lse = logsumexp_rows(logits)
        probs = torch.softmax(logits, dim=-1)
        # sum_v p_v z_v as a batched dot product: no (N, V) product tensor
        entropy = lse - torch.einsum("nv,nv->n", probs, logits)
        logprobs = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - lse
        if entropy_grad:
            ctx.save_for_backward(probs, labels, logits, lse, entropy)
        else:
            ctx.save_for_backward(probs, labels)
        ctx.entropy_grad = entropy_grad
        return logprobs, entropy

    @staticmethod
    def backward(ctx, g_logprobs: torch.Tensor | None, g_entropy: torch.Tensor | None):
        saved = ctx.saved_tensors  # read once: under activation checkpointing a second read is an error
        probs, labels = saved[:2]
        g_lp = g_logprobs if g_logprobs is not None else probs.new_zeros(probs.shape[0])
        grad = probs * (-g_lp).unsqueeze(-1)
        grad.scatter_add_(-1, labels.unsqueeze(-1), g_lp.unsqueeze(-1))
        if ctx.entropy_grad and g_entropy is not None:
            logits, lse, entropy = saved[2:]
            # dH/dz = -p * (log p + H), log p = z - lse
            grad -= g_entropy.unsqueeze(-1) * probs * (logits - (lse - entropy).unsqueeze(-1))
        return grad, None, None


def logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                         entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(logits)[label], entropy of softmax(logits)) per position, fp32: logits (..., V), labels (...)
    -> two (...) tensors. Equal to logprobs_from_logits and entropy_from_logits (to float rounding), gradients
    included; with entropy_grad False no gradient flows through the entropy (a logged metric)."""
    shape = labels.shape
    z = logits.float().reshape(-1, logits.shape[-1])
    logprobs, entropy = _LogprobsEntropy.apply(z, labels.reshape(-1), entropy_grad)
    if not entropy_grad:
        entropy = entropy.detach()
    return logprobs.reshape(shape), entropy.reshape(shape)


class _RowSparseLookup(torch.autograd.Function):
    """weight[ids] whose weight gradient is a coalesced sparse tensor of the rows the ids touch, summed in the
    order the ids come (as the dense embedding backward sums them).

    Why: the dense backward of an embedding lookup fills a (V, H) zero tensor (113 MB on the embedded model) and,
    when the weight is tied to the LM head, autograd adds it to the head's dense (V, H) gradient: two full passes
    over fresh, page-faulted memory for the few hundred rows a step touches. A sparse gradient added to the head's
    dense one in place gives every element as head + sum of its rows' gradients: the same bits."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, padding_idx: int | None):
        ctx.save_for_backward(ids)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ids, = ctx.saved_tensors
        flat, g = ids.reshape(-1), grad.reshape(ids.numel(), -1)
        if ctx.padding_idx is not None:  # the padding row gets no gradient, as in the dense backward
            keep = flat != ctx.padding_idx
            flat, g = flat[keep], g[keep]
        rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        # index_add_ adds in index order: each row's sum in the order its ids come, as the dense backward's
        sums = g.new_zeros(rows.numel(), g.shape[1]).index_add_(0, inverse, g)
        return (torch.sparse_coo_tensor(rows.unsqueeze(0), sums, ctx.shape, is_coalesced=True, check_invariants=False),
                None, None)


def embedding_row_sparse(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """weight[ids]: ids (...) -> (..., H), with a sparse (V, H) gradient for the weight (rows touched only)."""
    return _RowSparseLookup.apply(weight, ids, padding_idx)
