"""The decode loop: greedy equals transformers' generate, left padding is invisible, masks and stops are right."""

import torch

from ppolm.data.collate import left_pad_collate
from ppolm.models import load_model, load_tokenizer
from ppolm.models.policy import score_tokens
from ppolm.rollout import generate, truncate_at_stop
from ppolm.sampling import row_uniforms


def _setup():
    model, tok = load_model("tiny-random-llama"), load_tokenizer("tiny-random-llama")
    model.eval()
    prompts = ["hello there", "a much longer prompt than the first one", "x"]
    ids, mask = left_pad_collate([tok(p)["input_ids"] for p in prompts], tok.pad_token_id)
    return model, tok, prompts, ids, mask


def test_greedy_matches_transformers_generate():
    model, tok, prompts, ids, mask = _setup()
    out = generate(model, tok, ids, mask, row_uniforms(0, 0, [0, 1, 2], 8), max_new_tokens=8, temperature=0.0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert torch.equal(out.response_ids, ref[:, ids.shape[1]:][:, : out.response_ids.shape[1]])


def test_left_padding_does_not_change_samples_or_logprobs():
    model, tok, prompts, ids, mask = _setup()
    u = row_uniforms(0, 0, [0, 1, 2], 6)
    batched = generate(model, tok, ids, mask, u, max_new_tokens=6)
    single_ids = torch.tensor([tok(prompts[2])["input_ids"]])
    single = generate(model, tok, single_ids, torch.ones_like(single_ids), u[2:], max_new_tokens=6)
    n = int(single.response_mask.sum())
    assert torch.equal(batched.response_ids[2, :n], single.response_ids[0, :n])
    lp_b = score_tokens(model, batched.input_ids, batched.attention_mask, batched.response_ids).logprobs
    lp_s = score_tokens(model, single.input_ids, single.attention_mask, single.response_ids).logprobs
    assert torch.allclose(lp_b[2, :n], lp_s[0, :n], atol=1e-5)


def test_eos_ends_rows_and_masks():
    model, tok, prompts, ids, mask = _setup()
    eos = tok.eos_token_id
    # Bias the output layer towards EOS so rows end early; the EOS token is inside the mask, nothing after it.
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] *= 0
        model.lm_head.weight[eos] += 0.5 * model.model.norm.weight.sign()
    out = generate(model, tok, ids, mask, row_uniforms(0, 0, [0, 1, 2], 20), max_new_tokens=20)
    for b in range(3):
        n = int(out.response_mask[b].sum())
        if out.ended[b]:
            assert out.response_ids[b, n - 1].item() == eos
            assert out.response_mask[b, n:].sum() == 0
    assert out.ended.any()


def test_stop_strings():
    assert truncate_at_stop("abc\nxyz", ["\n"]) == ("abc", True)
    assert truncate_at_stop("abc", ["zz"]) == ("abc", False)
    model, tok, prompts, ids, mask = _setup()
    free = generate(model, tok, ids, mask, row_uniforms(0, 0, [0, 1, 2], 12), max_new_tokens=12)
    text = free.completions[0]
    stop = text[3:5] if len(text) >= 5 else None
    if stop:
        out = generate(model, tok, ids, mask, row_uniforms(0, 0, [0, 1, 2], 12), max_new_tokens=12, stop=[stop])
        assert stop not in out.completions[0] and out.ended[0]


def test_shared_prefill_groups_sample_what_repeated_prompts_sample():
    """samples_per_prompt=k prefills each prompt once and copies its cache: the k samples equal those of the
    prompt repeated k times with the same random streams, and rows of a group are contiguous."""
    model, tok, prompts, ids, mask = _setup()
    k = 3
    u = row_uniforms(0, 0, list(range(len(prompts) * k)), 8)
    grouped = generate(model, tok, ids, mask, u, max_new_tokens=8, samples_per_prompt=k)
    repeated = generate(model, tok, ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), u, max_new_tokens=8)
    assert grouped.response_ids.shape[0] == len(prompts) * k
    assert torch.equal(grouped.prompt_ids, ids.repeat_interleave(k, 0))
    assert torch.equal(grouped.response_ids, repeated.response_ids)
    assert torch.equal(grouped.response_mask, repeated.response_mask)
    # different streams within a group give different samples
    assert len({tuple(r.tolist()) for r in grouped.response_ids[:k]}) > 1
