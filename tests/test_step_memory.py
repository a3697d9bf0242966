"""Peak-memory changes of the PPO step that must not change a value: weight casts rebuilt in the backward, the
entropy metric without a graph, gradients released after the update, scikit-learn imported only when used."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ppolm import memory
from ppolm.config import PPORunConfig, load_config
from ppolm.models import load_model
from ppolm.models.policy import autocast_ctx, lm_logits_fp32, response_hidden, score_tokens
from ppolm.ops import logprobs_and_entropy
from ppolm.trainers.ppo import PPOTrainer

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row
    return ids, mask, ids[:, -5:]


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_recast_weights_give_bitwise_equal_logprobs_and_gradients(monkeypatch):
    model = load_model("tiny-random-llama")
    ids, mask, resp = _batch()
    # the plain way: autocast with its cache, every bf16 weight copy saved for the backward
    with autocast_ctx(torch.bfloat16, CPU):
        hidden = response_hidden(model, ids, mask, resp.shape[1])
    # (the log-prob function score_tokens uses with grad, so the only difference left is the recast)
    expected = logprobs_and_entropy(lm_logits_fp32(model, hidden), resp, entropy_grad=False)[0]
    expected.sum().backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    made = []

    class Counted(memory._Recast):
        def __init__(self, param, saved):
            super().__init__(param, saved)
            made.append(param)

    monkeypatch.setattr(memory, "_Recast", Counted)
    got = score_tokens(model, ids, mask, resp, autocast_dtype=torch.bfloat16).logprobs
    got.sum().backward()
    assert torch.equal(got, expected)
    grads = _grads(model)
    assert grads.keys() == expected_grads.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        assert torch.equal(g, expected_grads[name]), name
    # every linear weight of every decoder layer was kept as its fp32 source, not as a bf16 copy
    linear = {id(m.weight) for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)}
    assert linear and linear <= {id(p) for p in made}
    assert all(p.dtype == torch.float32 for p in made)


def test_recast_refuses_a_weight_changed_between_forward_and_backward():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), memory.recast_saved_weights():
        y = layer(x)
    with torch.no_grad():
        layer.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.float().sum().backward()


def test_only_casts_of_leaf_weights_are_recast():
    w = torch.nn.Parameter(torch.randn(4, 3))
    cast = w.to(torch.bfloat16)
    assert memory._cast_source(cast) is w
    assert memory._cast_source(cast.t()) is w  # a view of the cast (what a matmul saves)
    assert memory._Recast(w, cast.t()).rebuild().equal(cast.t())
    assert memory._cast_source((w * 2).to(torch.bfloat16)) is None  # an activation, not a weight
    assert memory._cast_source(w) is None and memory._cast_source(cast.detach()) is None


def test_entropy_as_a_metric_has_the_same_values_and_no_graph():
    model = load_model("tiny-random-llama")
    ids, mask, resp = _batch()
    with_graph = score_tokens(model, ids, mask, resp, need_entropy=True)
    metric = score_tokens(model, ids, mask, resp, need_entropy=True, entropy_grad=False)
    assert with_graph.entropy.requires_grad and not metric.entropy.requires_grad
    assert torch.equal(metric.entropy, with_graph.entropy.detach())
    assert torch.equal(metric.logprobs, with_graph.logprobs) and metric.logprobs.requires_grad
    assert float(metric.entropy.min()) > 0.0


def test_a_ppo_step_releases_its_gradients(tmp_path):
    cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [
        "log.progress=false", "log.tensorboard=false", f"output_dir={tmp_path}", "max_steps=1",
        "checkpoint.every=0"])
    # a reward that varies between responses, so that the advantages and the gradients are not all zero
    trainer = PPOTrainer(cfg, reward_fn=lambda prompts, completions, **_: [float(len(set(c))) for c in completions])
    before = {n: p.detach().clone() for n, p in trainer.actor.named_parameters()}
    out = trainer.step(0)
    assert out.metrics["optim/grad_norm"] > 0.0
    assert any(not torch.equal(p, before[n]) for n, p in trainer.actor.named_parameters())  # it did step
    assert all(p.grad is None for p in trainer.actor.parameters())


def test_reward_functions_do_not_import_scikit_learn():
    code = "import sys, ppolm.rewards.compose, ppolm.eval.metrics; print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_reference_with_bf16_linear_weights_scores_bitwise_like_the_policy_under_autocast():
    """frozen_copy(matmul_dtype=bf16): the backbone's linear weights stored pre-rounded, the LM head, embeddings
    and norms in fp32; under bf16 autocast its log-probs equal the policy's bit for bit (KL 0 at step 0)."""
    from ppolm.models.policy import frozen_copy

    policy = load_model("tiny-random-llama")
    ids, mask, resp = _batch()
    reference = frozen_copy(policy, matmul_dtype=torch.bfloat16)
    linears = [m for m in reference.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert reference.get_output_embeddings().weight.dtype == torch.float32
    assert reference.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in reference.named_parameters() if "norm" in n)
    with torch.no_grad():
        want = score_tokens(policy, ids, mask, resp, autocast_dtype=torch.bfloat16).logprobs
        got = score_tokens(reference, ids, mask, resp, autocast_dtype=torch.bfloat16).logprobs
    assert torch.equal(got, want)
    assert all(p.dtype == torch.float32 for p in policy.parameters())  # the policy itself is untouched


class _OpCount(TorchDispatchMode):
    """Counts the aten ops that run while it is active (here: in a backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count[func] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(mode, amp) -> tuple[torch.Tensor, dict[str, torch.Tensor], collections.Counter]:
    ids, mask, resp = _batch()
    model = load_model("tiny-random-llama")
    memory.enable_activation_checkpointing(model, mode)
    model.train()
    logprobs = score_tokens(model, ids, mask, resp, autocast_dtype=amp).logprobs
    with _OpCount() as ops:
        logprobs.sum().backward()
    return logprobs.detach(), _grads(model), ops.count


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_selective_checkpointing_gives_bitwise_equal_logprobs_and_gradients(amp):
    """gradient_checkpointing='selective': the backward recomputes the elementwise ops of each layer
    (SiLU, the norms' rsqrt) from its kept matmul outputs, and runs no more matmuls than without checkpointing
    (full checkpointing runs each layer's matmuls again); log-probs and every gradient equal bit for bit."""
    want, expected, plain_ops = _backward_ops(False, amp)
    got, grads, ops = _backward_ops("selective", amp)
    _, _, full_ops = _backward_ops(True, amp)
    assert torch.equal(got, want)
    assert grads.keys() == expected.keys() and len(grads) == 20  # every parameter of the tiny model
    for name, g in grads.items():
        assert torch.equal(g, expected[name]), name
    mm, silu, rsqrt = torch.ops.aten.mm.default, torch.ops.aten.silu.default, torch.ops.aten.rsqrt.default
    assert plain_ops[silu] == plain_ops[rsqrt] == 0  # without checkpointing the backward recomputes nothing
    assert ops[silu] > 0 and ops[rsqrt] > 0  # selective: the cheap ops again
    assert ops[mm] == plain_ops[mm] < full_ops[mm]  # ... and no matmul again


def test_selective_checkpointing_leaves_a_model_without_checkpointing_support_as_it_is():
    model = load_model("tiny-random-llama")
    model.supports_gradient_checkpointing = False  # (as for model code without transformers' checkpointing hook)
    memory.enable_activation_checkpointing(model, "selective")  # the default: no error, no checkpointing
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    with pytest.raises(ValueError, match="does not support"):  # asked for explicitly: transformers refuses
        memory.enable_activation_checkpointing(model, True)


def test_gradient_checkpointing_takes_false_true_selective_or_auto():
    from ppolm.errors import ConfigError

    base = ["model=tiny-random-llama", "output_dir=unused"]
    assert load_config(PPORunConfig, None, base).gradient_checkpointing == "auto"  # resolved at start (ppolm.plan_report)
    assert load_config(PPORunConfig, None, base + ["gradient_checkpointing=selective"]).gradient_checkpointing == "selective"
    assert load_config(PPORunConfig, None, base + ["gradient_checkpointing=true"]).gradient_checkpointing is True
    assert load_config(PPORunConfig, None, base + ["gradient_checkpointing=false"]).gradient_checkpointing is False
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(PPORunConfig, None, base + ["gradient_checkpointing=sometimes"])


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
@pytest.mark.parametrize("entropy_grad", [False, True])
def test_chunked_lm_head_scores_like_one_projection(monkeypatch, amp, entropy_grad):
    """Past LOGIT_CHUNK_ROWS positions the LM head runs in checkpointed chunks: the same log-probs, entropy and
    gradients (to fp32 rounding: the head's gradient is summed chunk by chunk), each chunk's logits recomputed
    in the backward instead of kept."""
    from ppolm.models import policy

    ids, mask, resp = _batch()  # 3 x 5 response positions

    def run(rows: int):
        monkeypatch.setattr(policy, "LOGIT_CHUNK_ROWS", rows)
        model = load_model("tiny-random-llama")
        out = score_tokens(model, ids, mask, resp, need_entropy=True, autocast_dtype=amp, temperature=0.7,
                           entropy_grad=entropy_grad)
        loss = out.logprobs.sum() + (out.entropy.sum() if entropy_grad else 0.0)
        with _OpCount() as ops:
            loss.backward()
        return out, _grads(model), ops.count[torch.ops.aten.logsumexp.default]

    want, want_grads, plain_recomputes = run(1000)  # one projection
    got, grads, recomputes = run(4)  # chunks of 4, 4, 4 and 3 rows
    # each chunk's forward ran again in the backward, once (`logprobs_and_entropy`: one logsumexp for the
    # log-probs and the entropy)
    assert plain_recomputes == 0 and recomputes == 4
    assert got.logprobs.requires_grad and got.entropy.requires_grad == entropy_grad
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.entropy, want.entropy, rtol=0, atol=1e-6)
    assert grads.keys() == want_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():  # the no-grad path (reference, old log-probs) chunks without checkpoints
        monkeypatch.setattr(policy, "LOGIT_CHUNK_ROWS", 4)
        again = score_tokens(load_model("tiny-random-llama"), ids, mask, resp, autocast_dtype=amp,
                             temperature=0.7).logprobs
    torch.testing.assert_close(again, want.logprobs.detach(), rtol=0, atol=1e-6)


_RETAIN_CHILD = """
import sys, torch
from ppolm.memory import retain_freed_memory
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
took = retain_freed_memory()
before = rss_mb()
x = torch.ones(200 * 2**20 // 4)  # 200 MB: above glibc's default mmap threshold (32 MB at most)
del x
print(took, rss_mb() - before)
"""


@pytest.mark.parametrize("setting, retained", [("1", True), ("0", False)])
def test_freed_large_tensors_stay_in_the_heap_only_when_turned_on(setting, retained):
    """retain_freed_memory (every CPU Runtime calls it) with PPOLM_MALLOC_TUNING=1: a freed 200 MB tensor stays
    resident for the next step's tensors instead of going back to the kernel (whose fresh pages must be faulted
    in again); by default (0) glibc's behaviour is kept, where it is unmapped at once."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt is Linux-only")
    import os

    env = {**os.environ, "PPOLM_MALLOC_TUNING": setting, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _RETAIN_CHILD], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    took, kept_mb = out.stdout.split()
    assert took == str(retained)
    assert (float(kept_mb) > 150) if retained else (float(kept_mb) < 50), kept_mb


def test_a_graph_dropped_without_a_backward_is_freed_under_recast_saved_weights():
    """An op that saves its own output (silu, exp, softmax) under the saved-tensor hooks: dropping the graph
    without a backward (what an out-of-memory retry does) frees it; the pack hook once returned the tensor itself,
    a reference cycle through autograd that Python's collector cannot see (0.59 GB kept per dropped forward of the
    embedded model). The gradient is unchanged."""
    import weakref

    x = torch.randn(64, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), memory.recast_saved_weights():
        y = torch.nn.functional.silu(x @ x).exp()
    alive = weakref.ref(y)
    del y
    assert alive() is None
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), memory.recast_saved_weights():
        y = torch.nn.functional.silu(x @ x).exp()
    y.float().sum().backward()
    hooked, x.grad = x.grad, None
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        torch.nn.functional.silu(x @ x).exp().float().sum().backward()
    assert torch.equal(hooked, x.grad)
