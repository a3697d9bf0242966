"""A tied embedding's gradient without the (V, H) zero fill: the row-sparse lookup (ppolm.ops.embedding_row_sparse),
installed on the trained copy of a tied model (ppolm.memory.row_sparse_tied_embeddings), must change no value."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ppolm import memory
from ppolm.config import OptimConfig, PPORunConfig, load_config
from ppolm.memory import RowSparseGradEmbedding, row_sparse_tied_embeddings
from ppolm.models import load_model
from ppolm.models.policy import apply_lora, disable_dropout, score_tokens
from ppolm.ops import embedding_row_sparse
from ppolm.runtime import Runtime
from ppolm.trainers.common import make_optimization
from ppolm.trainers.ppo import PPOTrainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """Both thread counts: a kernel that splits its sums over threads would add in another order."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [7, 600, 5000, 40000])
def test_row_sparse_lookup_sums_each_row_as_the_dense_backward_does(n, threads):
    gen = torch.Generator().manual_seed(n)
    weight = torch.randn(40, 8, generator=gen, requires_grad=True)
    ids = torch.randint(0, 12, (n,), generator=gen)  # many repeats of each row; row 3 is padding
    ids[0] = 3
    grad_out = torch.randn(n, 8, generator=gen)
    head_grad = torch.randn(40, 8, generator=gen)
    F.embedding(ids, weight, padding_idx=3).backward(grad_out)
    dense = weight.grad
    weight.grad = None
    out = embedding_row_sparse(ids, weight, padding_idx=3)
    assert torch.equal(out, F.embedding(ids, weight, padding_idx=3))
    out.backward(grad_out)
    sparse = weight.grad
    assert sparse.is_sparse
    assert sorted(sparse._indices()[0].tolist()) == sorted(set(ids.tolist()) - {3})  # touched rows, padding not
    assert torch.equal(sparse.to_dense(), dense)
    # what autograd does with a tied weight: the head's dense gradient plus this one, bit for bit
    assert torch.equal(head_grad.clone().add_(sparse), head_grad + dense)
    # a hand-computed case: row 1 taken twice, row 0 once
    w = torch.zeros(3, 2, requires_grad=True)
    embedding_row_sparse(torch.tensor([1, 0, 1]), w).backward(torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert torch.equal(w.grad.to_dense(), torch.tensor([[3.0, 4.0], [6.0, 8.0], [0.0, 0.0]]))


def _grads(model: torch.nn.Module, amp: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Gradients of two accumulated micro-batches of response log-probs (left-padded rows, repeated tokens)."""
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(4, 30, (3, 14), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        ids[0, :5] = 0  # the pad token
        score_tokens(model, ids, mask, ids[:, -6:], autocast_dtype=amp).logprobs.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_a_tied_models_gradients_are_bitwise_those_of_the_dense_embedding(name, amp, threads):
    model = load_model(name)
    disable_dropout(model)  # (GPT-2's): two forwards must be alike
    sparse = copy.deepcopy(model)
    assert row_sparse_tied_embeddings(sparse) == 1
    assert type(sparse.get_input_embeddings()) is RowSparseGradEmbedding
    assert sparse.get_input_embeddings().weight is sparse.get_output_embeddings().weight
    expected, got = _grads(model, amp), _grads(sparse, amp)
    assert got.keys() == expected.keys()
    assert all(not g.is_sparse and torch.equal(g, expected[n]) for n, g in got.items())
    assert sparse.state_dict().keys() == model.state_dict().keys()
    copy.deepcopy(sparse)  # a copy (keep-best snapshots, references) still works


def test_only_a_trained_embedding_tied_to_its_head_gets_the_row_sparse_gradient():
    from ppolm.models.tiny import tiny_model

    untied, _ = tiny_model("tiny-random-llama")
    untied.config.tie_word_embeddings = False
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    assert row_sparse_tied_embeddings(untied) == 0
    frozen = load_model("tiny-random-llama")
    frozen.requires_grad_(False)
    assert row_sparse_tied_embeddings(frozen) == 0
    lora = apply_lora(load_model("tiny-random-llama"), 4, 8, 0.0, ["q_proj", "v_proj"])  # the embedding is frozen
    assert row_sparse_tied_embeddings(lora) == 0
    assert type(lora.get_input_embeddings()) is torch.nn.Embedding


def test_a_sparse_gradient_that_no_head_absorbed_is_made_dense_before_the_step():
    emb = RowSparseGradEmbedding(10, 4)
    optim = make_optimization(emb, Runtime(), OptimConfig(lr=0.1), total_steps=1)
    before = emb.weight.detach().clone()
    result = optim.step([torch.tensor([1, 1, 2])], lambda ids: (emb(ids).sum(), {}))
    assert not result.skipped and result.grad_norm == pytest.approx(float(torch.tensor([2.0] * 4 + [1.0] * 4).norm()))
    changed = (emb.weight.detach() != before).any(-1)
    assert changed.tolist() == [False, True, True] + [False] * 7  # AdamW moved the looked-up rows only


def test_a_ppo_run_gets_it_and_steps_to_the_same_weights_as_without(tmp_path, monkeypatch):
    def run(out: Path) -> PPOTrainer:
        cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [
            "log.progress=false", "log.tensorboard=false", f"output_dir={out}", "max_steps=2",
            "checkpoint.every=0", "precision=bf16"])
        trainer = PPOTrainer(cfg, reward_fn=lambda prompts, completions, **_: [float(len(set(c))) for c in completions])
        start = trainer.actor.policy.get_input_embeddings().weight.detach().clone()
        for step in range(2):
            assert trainer.step(step).metrics["optim/grad_norm"] > 0.0
        assert not torch.equal(trainer.actor.policy.get_input_embeddings().weight, start)  # the embedding trained
        return trainer

    with_it = run(tmp_path / "a")
    assert type(with_it.actor.policy.get_input_embeddings()) is RowSparseGradEmbedding
    monkeypatch.setattr(memory, "row_sparse_tied_embeddings", lambda model: 0)
    without = run(tmp_path / "b")
    assert type(without.actor.policy.get_input_embeddings()) is torch.nn.Embedding
    after = dict(without.actor.named_parameters())
    assert all(torch.equal(p, after[n]) for n, p in with_it.actor.named_parameters())
