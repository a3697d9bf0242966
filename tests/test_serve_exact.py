"""The server samples from the model's own distribution: greedy tokens served by `ppolm serve` equal
`model.generate(do_sample=False)` token for token, and the log-probs it samples from equal a full forward's,
for one request alone and for eight joining a running batch at different steps (left padding, cache merges),
on tiny-random-llama and (slow) on the embedded SmolLM2; and `ppolm serve` on an export answers held-out rows
with the same completions and labels as `ppolm eval`'s `evaluate` on that export (greedy).

The other serving tests compare the engine only with itself (batched vs alone), which a mask that is wrong the
same way in both cases passes."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import ppolm.serve.batch as serve_batch
from ppolm.models import EMBEDDED, load_model, load_tokenizer
from ppolm.serve import DecodingDefaults, ServeLimits, create_app, load_served, serve_in_background

TINY = "tiny-random-llama"


def sharp_tiny() -> torch.nn.Module:
    """tiny-random-llama with its matrices redrawn at std 0.3 from a fixed seed. At the default 0.02 init the
    greedy path repeats one token whatever the context, so "same tokens" would hold for a wrong cache too."""
    model = load_model(TINY)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=gen)
    return model.eval()


class Spy:
    """Wraps the engine's sampler: per prompt (as a tuple of ids), the (V,) fp32 logits each token was drawn
    from and the token drawn. The worker thread writes, the test reads after the requests are done."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.logits: dict[tuple[int, ...], list[torch.Tensor]] = {}
        self.tokens: dict[tuple[int, ...], list[int]] = {}
        self.lock = threading.Lock()
        real = serve_batch.sample_next

        def spy(logits: torch.Tensor, rows: list) -> list[int]:
            out = real(logits, rows)
            with self.lock:
                for row, lg, tok in zip(rows, logits, out, strict=True):
                    key = tuple(row.req.prompt_ids)
                    self.logits.setdefault(key, []).append(lg.detach().float().cpu())
                    self.tokens.setdefault(key, []).append(tok)
            return out

        monkeypatch.setattr(serve_batch, "sample_next", spy)


def generate_greedy(model, prompt: list[int], n: int) -> list[int]:
    """`model.generate(do_sample=False)` on one unpadded prompt, EOS disabled so it runs `n` tokens (the served
    rows use ignore_eos)."""
    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


def full_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(n, V) log pi(. | prompt, tokens[:t]) from one forward over the whole sequence, no cache."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


def serve_staggered(model, tokenizer, prompts: list[list[int]], budgets: list[int], spy: Spy, *,
                    join_every: int) -> tuple[list[dict], object]:
    """POST each prompt (token ids) greedy to /v1/completions; request i is sent once the engine has run
    `join_every` more decode steps, so it joins the running batch (join_every=0: all at once)."""
    app = create_app(model, tokenizer, model_name="m", limits=ServeLimits(), defaults=DecodingDefaults())
    stats = app.state.engine.stats

    async def fire(url: str) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            tasks = []
            for prompt, n in zip(prompts, budgets, strict=True):
                if tasks and join_every:
                    target = stats.steps + join_every
                    while stats.steps < target:
                        await asyncio.sleep(0.001)
                body = {"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
                tasks.append(asyncio.create_task(client.post("/v1/completions", json=body)))
            responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200] * len(prompts), [r.text for r in responses]
        return [r.json() for r in responses]

    with serve_in_background(app) as url:
        return asyncio.run(fire(url)), stats


def check_against_plain_model(model, tokenizer, prompts, budgets, bodies, spy: Spy, atol: float) -> None:
    for prompt, n, body in zip(prompts, budgets, bodies, strict=True):
        served = spy.tokens[tuple(prompt)]
        expected = generate_greedy(model, prompt, n)
        assert served == expected, f"prompt {prompt[:8]}...: served {served} != generate {expected}"
        assert body["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert body["usage"]["completion_tokens"] == n
        served_lp = torch.log_softmax(torch.stack(spy.logits[tuple(prompt)]), dim=-1)
        gap = (served_lp - full_logprobs(model, prompt, served)).abs().amax(dim=-1)
        assert gap.max() < atol, f"served log-probs differ from a full forward by {gap.tolist()}"


def slowed(model, seconds: float):
    """A forward hook that sleeps, so requests sent between steps join a batch that is still running."""
    model.register_forward_hook(lambda *_: time.sleep(seconds))
    return model


# ---- tiny-random-llama ------------------------------------------------------------------------------------------


def test_one_greedy_request_equals_generate_and_a_full_forward(monkeypatch):
    model, tokenizer = sharp_tiny(), load_tokenizer(TINY)
    spy = Spy(monkeypatch)
    prompts = [tokenizer.encode("The quick brown fox", add_special_tokens=False)]
    bodies, _ = serve_staggered(model, tokenizer, prompts, [16], spy, join_every=0)
    check_against_plain_model(model, tokenizer, prompts, [16], bodies, spy, atol=1e-4)


def test_eight_requests_joining_at_different_steps_equal_generate(monkeypatch):
    model, tokenizer = sharp_tiny(), load_tokenizer(TINY)
    spy = Spy(monkeypatch)
    texts = ["hi", "a much longer prompt than the others", "x", "medium prompt", "abc def", "Once upon a time",
             "?", "the end of the list"]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    budgets = [40 - 3 * i for i in range(8)]  # earlier requests run longer, so all eight overlap
    bodies, stats = serve_staggered(slowed(model, 0.005), tokenizer, prompts, budgets, spy, join_every=2)
    assert stats.batches >= 4, "the requests should have joined the batch at different steps"
    assert stats.max_batch_rows >= 4
    check_against_plain_model(model, tokenizer, prompts, budgets, bodies, spy, atol=1e-4)


# ---- the embedded default ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_served_greedy_equals_generate(monkeypatch):
    """SmolLM2-135M-Instruct: one chat prompt alone, then three joining each other; a few tokens each."""
    model, tokenizer = load_model(EMBEDDED).eval(), load_tokenizer(EMBEDDED)
    spy = Spy(monkeypatch)
    questions = ["Name a colour.", "What is two plus two?", "Write one word about the sea.", "Say hello."]
    # Tokenized as the chat route does: the template's text, then encode without special tokens.
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                              add_generation_prompt=True), add_special_tokens=False)
               for q in questions]
    alone, _ = serve_staggered(model, tokenizer, prompts[:1], [6], spy, join_every=0)
    check_against_plain_model(model, tokenizer, prompts[:1], [6], alone, spy, atol=5e-4)
    budgets = [8, 6, 4]
    joined, stats = serve_staggered(model, tokenizer, prompts[1:], budgets, spy, join_every=1)
    assert stats.batches >= 2 and stats.max_batch_rows >= 2
    check_against_plain_model(model, tokenizer, prompts[1:], budgets, joined, spy, atol=5e-4)


# ---- serve vs eval on an export ----------------------------------------------------------------------------------


def test_served_export_labels_equal_eval_labels(tmp_path: Path):
    """An export written by the pipeline's export step (weights + tokenizer + ppolm_decoding.json), served with
    its own decoding defaults through the chat route, answers held-out demo rows exactly as `evaluate` does."""
    from ppolm.eval.metrics import label_from_completion
    from ppolm.eval.run import evaluate
    from ppolm.pipeline import Candidate, export_candidate
    from ppolm.tasks import build_task
    from ppolm.trainers.common import split_held_out

    stage = tmp_path / "final"  # what a training stage leaves: a model directory with its tokenizer
    sharp_tiny().save_pretrained(stage, safe_serialization=True)
    load_tokenizer(TINY).save_pretrained(stage)
    task = build_task("classification", {})
    chosen = Candidate(name="sft", model_dir=str(stage), metrics={}, train_seconds=0.0, eval_seconds=0.0)
    export = export_candidate(chosen, task, tmp_path / "export", TINY)

    held = split_held_out(task.load_all(None), 0.2, 0)[1][:8]
    model, tokenizer, served, defaults = load_served(str(export), device="cpu")
    assert defaults.temperature == 0.0 and defaults.system_prompt == task.system_prompt
    result = evaluate(task, model, tokenizer, held, batch_size=8, label_scores=False)
    labels = task.label_words(held)

    app = create_app(model, tokenizer, model_name=served, limits=ServeLimits(), defaults=defaults)

    async def ask(url: str) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            bodies = [{"model": served, "messages": [{"role": "user", "content": ex.prompt}]} for ex in held]
            responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
        assert [r.status_code for r in responses] == [200] * len(held)
        return [r.json()["choices"][0]["message"]["content"] for r in responses]

    with serve_in_background(app) as url:
        answers = asyncio.run(ask(url))
    # A random model rarely says a label word, so most labels are None on both sides: the completions, from
    # which the labels are read, are the comparison that carries the weight.
    assert answers == [p["completion"] for p in result.predictions]
    assert [label_from_completion(a, labels) for a in answers] == [p["scores"]["predicted"] for p in result.predictions]
