"""`ppolm serve` end to end: a real uvicorn server on 127.0.0.1 with tiny-random-llama, driven by httpx and by
the official openai client (plain, chat, streaming), plus batching, stop strings, seeds and decoding defaults."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from ppolm.errors import ConfigError
from ppolm.models import load_model, load_tokenizer
from ppolm.serve import DecodingDefaults, Engine, SamplingParams, ServeLimits, create_app, serve_in_background

MODEL = "tiny-random-llama"
KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}



@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def server(tokenizer) -> Iterator[tuple[str, object]]:
    app = create_app(
        load_model(MODEL), tokenizer, model_name=MODEL, limits=ServeLimits(), defaults=DecodingDefaults(), api_key=KEY
    )
    with serve_in_background(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], headers=AUTH, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=30)


def sse_events(response: httpx.Response) -> list[dict | str]:
    """Parse a server-sent-event body into JSON chunks; the terminal marker stays the string '[DONE]'."""
    out: list[dict | str] = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line[len("data: ") :]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def complete(http: httpx.Client, **body) -> dict:
    r = http.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_health_and_models(http):
    assert http.get("/health").json()["status"] == "ok"
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert http.get("/v1/models/other").status_code == 404


def test_completion_follows_openai_schema(http, tokenizer):
    prompt = "The quick brown fox"
    body = complete(http, prompt=prompt, max_tokens=7, ignore_eos=True, seed=3)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == MODEL
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert usage["completion_tokens"] == 7  # ignore_eos: exactly the budget
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7


def test_chat_uses_the_chat_template(http, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    templated = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(templated, add_special_tokens=False))
    assert 1 <= body["usage"]["completion_tokens"] <= 5


def test_seed_reproduces_and_greedy_is_deterministic(http):
    a = complete(http, prompt="abc", max_tokens=12, seed=11, temperature=1.0, ignore_eos=True)
    b = complete(http, prompt="abc", max_tokens=12, seed=11, temperature=1.0, ignore_eos=True)
    c = complete(http, prompt="abc", max_tokens=12, seed=12, temperature=1.0, ignore_eos=True)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["choices"][0]["text"] != c["choices"][0]["text"]  # 12 random bytes from a 260-token vocabulary
    g1 = complete(http, prompt="abc", max_tokens=8, temperature=0, seed=1)
    g2 = complete(http, prompt="abc", max_tokens=8, temperature=0, seed=2)
    assert g1["choices"][0]["text"] == g2["choices"][0]["text"]


def test_stop_string_truncates_plain_and_streamed(http):
    base = dict(prompt="Once upon", max_tokens=40, seed=5, temperature=1.0, ignore_eos=True)
    full = complete(http, **base)["choices"][0]["text"]
    clean = [i for i in range(3, len(full) - 2) if "\ufffd" not in full[i : i + 2]]
    assert clean, full
    stop = full[clean[0] : clean[0] + 2]
    expected = full[: full.find(stop)]
    cut = complete(http, **base, stop=[stop, "never-appears"])
    assert cut["choices"][0]["text"] == expected and cut["choices"][0]["finish_reason"] == "stop"
    with http.stream("POST", "/v1/completions", json={"model": MODEL, **base, "stop": stop, "stream": True}) as r:
        events = sse_events(r)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_streaming_completion_matches_plain(http):
    base = dict(prompt="hello", max_tokens=10, seed=9, ignore_eos=True)
    plain = complete(http, **base)["choices"][0]["text"]
    body = {"model": MODEL, **base, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage_chunk, finish_chunk = events[-2], events[-3]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 10
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == plain


def test_streaming_chat_chunks(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_openai_client_completions_chat_and_stream(oai):
    c = oai.completions.create(model=MODEL, prompt="hi", max_tokens=5, seed=1, extra_body={"top_k": 20})
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.completion_tokens <= 5
    chat = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_completion_tokens=6, temperature=0.7,
        top_p=0.9, stop=["\n\n"],
    )
    assert chat.choices[0].message.role == "assistant" and chat.usage.total_tokens > chat.usage.prompt_tokens
    pieces, finish = [], None
    stream = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8, stream=True, seed=4,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "length"
    plain = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8, seed=4,
        extra_body={"ignore_eos": True},
    )
    assert "".join(pieces) == plain.choices[0].message.content
    text_stream = oai.completions.create(model=MODEL, prompt="x", max_tokens=4, stream=True)
    assert [ch.choices[0].finish_reason for ch in text_stream][-1] in ("stop", "length")


def test_openai_client_sees_errors(oai, server):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=5, n=3)
    assert err.value.body["param"] == "n"
    bad_key = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()


def test_context_length_error_names_the_numbers(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "a" * 500, "max_tokens": 20})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "500" in message and "20" in message and "512" in message
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_concurrent_requests_are_batched(server):
    url, app = server
    stats = app.state.engine.stats
    batches0, rows0 = stats.batches, stats.rows

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
            bodies = [
                {"model": MODEL, "prompt": "x" * (3 + 7 * i), "max_tokens": 24, "seed": i, "ignore_eos": True}
                for i in range(8)
            ]
            return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 8
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in responses)
    assert stats.rows - rows0 == 8
    assert stats.batches - batches0 < 8
    assert stats.max_batch_rows >= 2


def test_padding_does_not_change_a_row(tokenizer):
    """A row's sampled tokens are the same alone and left-padded in one batch with longer prompts."""
    engine = Engine(load_model(MODEL), tokenizer, max_batch_size=3, batch_wait_s=0.0)
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in ("hi", "a much longer prompt", "medium one")]
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=12, seed=21, ignore_eos=True)

    async def run(batch: list[list[int]]) -> list[str]:
        reqs = [engine.submit(p, params) for p in batch]
        return ["".join([x async for x in engine.events(r) if isinstance(x, str)]) for r in reqs]

    async def main() -> tuple[list[str], list[str]]:
        await engine.start()
        try:
            together = await run(prompts)
            alone = [(await run([p]))[0] for p in prompts]
        finally:
            await engine.stop()
        return together, alone

    together, alone = asyncio.run(main())
    assert engine.stats.max_batch_rows == 3  # decoded together (they may have joined the batch at different steps)
    assert together == alone and len(set(together)) == 3


def test_decoding_defaults_apply_unless_overridden(tmp_path: Path, tokenizer):
    (tmp_path / "ppolm_decoding.json").write_text(
        json.dumps({"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 3, "stop": [],
                    "system_prompt": "You are terse."})
    )
    defaults = DecodingDefaults.from_dir(tmp_path)
    assert defaults.max_new_tokens == 3 and defaults.temperature == 0.0 and defaults.system_prompt == "You are terse."
    app = create_app(load_model(MODEL), tokenizer, model_name="m", limits=ServeLimits(), defaults=defaults)
    with serve_in_background(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        messages = [{"role": "user", "content": "hi"}]
        body = client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "ignore_eos": True})
        usage = body.json()["usage"]
        assert usage["completion_tokens"] == 3  # max_new_tokens from the file
        with_system = [{"role": "system", "content": "You are terse."}, *messages]
        templated = tokenizer.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False)
        assert usage["prompt_tokens"] == len(tokenizer.encode(templated, add_special_tokens=False))
        over = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 6, "ignore_eos": True})
        assert over.json()["usage"]["completion_tokens"] == 6
    (tmp_path / "ppolm_decoding.json").write_text('{"stop": "###"}')
    assert DecodingDefaults.from_dir(tmp_path).stop == ("###",)
    # What the trainers and the pipeline record next to the decoding settings is metadata, not an error.
    (tmp_path / "ppolm_decoding.json").write_text('{"top_k": 5, "task": "ner", "stage": "ppo", "base_model": "m"}')
    assert DecodingDefaults.from_dir(tmp_path) == DecodingDefaults(top_k=5)
    for bad in ('{"temperature": 5}', '{"stop": [1]}', "[1]", "{", '{"system_prompt": 3}'):
        (tmp_path / "ppolm_decoding.json").write_text(bad)
        with pytest.raises(ConfigError):
            DecodingDefaults.from_dir(tmp_path)
    assert DecodingDefaults.from_dir(tmp_path / "missing") == DecodingDefaults()


def test_limits_reject_bad_settings():
    with pytest.raises(ValueError):
        ServeLimits(max_concurrent_requests=0)
    with pytest.raises(ValueError):
        ServeLimits(max_body_bytes=-1)


def test_new_request_joins_the_running_batch(tokenizer):
    """Continuous batching: a request that arrives while a long one decodes joins at the next step, finishes
    first, and samples exactly the tokens it samples alone (its cache is merged with different padding)."""
    model = load_model(MODEL)
    model.register_forward_hook(lambda *_: __import__("time").sleep(0.01))
    engine = Engine(model, tokenizer, max_batch_size=4, batch_wait_s=0.0)
    long_p = tokenizer.encode("a much longer prompt than the other", add_special_tokens=False)
    short_p = tokenizer.encode("hi", add_special_tokens=False)
    long_params = SamplingParams(temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=40, seed=1, ignore_eos=True)
    short_params = SamplingParams(temperature=0.8, top_p=1.0, top_k=20, max_new_tokens=6, seed=2, ignore_eos=True)

    async def text(req) -> str:
        return "".join([x async for x in engine.events(req) if isinstance(x, str)])

    async def main() -> tuple[list[str], list[str], list[str]]:
        await engine.start()
        try:
            order: list[str] = []
            long_req = engine.submit(long_p, long_params)

            async def tagged(name: str, req) -> str:
                out = await text(req)
                order.append(name)
                return out

            long_task = asyncio.create_task(tagged("long", long_req))
            while engine.stats.tokens < 5:  # the long row is decoding
                await asyncio.sleep(0.005)
            short = await tagged("short", engine.submit(short_p, short_params))
            joined = [await long_task, short]
            alone = [await text(engine.submit(long_p, long_params)), await text(engine.submit(short_p, short_params))]
        finally:
            await engine.stop()
        return order, joined, alone

    order, joined, alone = asyncio.run(main())
    assert order == ["short", "long"]
    assert engine.stats.max_batch_rows == 2
    assert joined == alone
