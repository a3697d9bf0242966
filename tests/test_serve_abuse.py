"""Hostile input for `ppolm serve`: a generated corpus of 200+ bad requests must each get a 4xx in OpenAI's error
format (never a 5xx, never a hang), the server must stay healthy afterwards, and the concurrency limit gives 429."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from ppolm.models import load_model, load_tokenizer
from ppolm.serve import DecodingDefaults, ServeLimits, create_app, serve_in_background

MODEL = "tiny-random-llama"
KEY = "sk-abuse"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = ServeLimits(max_body_bytes=64_000, max_prompt_chars=20_000, max_messages=32, max_tokens=256)
COMPLETION = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@dataclass
class Case:
    name: str
    path: str
    content: bytes | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json", **AUTH})
    expect: int | None = None  # exact status when the case pins one; otherwise any 4xx


def js(name: str, path: str, body: object, expect: int | None = None) -> Case:
    return Case(name, path, json.dumps(body).encode(), expect=expect)


def raw(name: str, path: str, text: bytes | str, expect: int | None = 400) -> Case:
    return Case(name, path, text if isinstance(text, bytes) else text.encode(), expect=expect)


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


# Wrong-typed values for each kind of field; None is left out because it means "unset" for optional fields.
NOT_INT = ["5", 5.5, 1.0, True, [], {}, "five"]
NOT_FLOAT = ["hot", "0.5", True, [], {"v": 1}]
NOT_STR = [5, 1.5, True, [], {}, ["x"]]
NOT_BOOL = ["yes", 1, 0, [], {}]
FIELD_TYPES = {
    "max_tokens": NOT_INT, "temperature": NOT_FLOAT, "top_p": NOT_FLOAT, "top_k": NOT_INT, "n": NOT_INT,
    "seed": NOT_INT, "stream": NOT_BOOL, "model": NOT_STR, "user": NOT_STR, "ignore_eos": NOT_BOOL,
    "stop": [5, [5], [[]], {"a": 1}, True, [None]], "stream_options": ["x", 1, {"include_usage": "yes"}, {"x": 1}],
    "presence_penalty": NOT_FLOAT, "frequency_penalty": NOT_FLOAT, "logit_bias": ["x", [1], {"1": "x"}],
}


def build_corpus() -> list[Case]:
    c: list[Case] = []
    for path, base in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
        tag = "chat" if "chat" in path else "cmpl"
        for fname, values in FIELD_TYPES.items():
            for v in values:
                c.append(js(f"{tag} {fname}={v!r}", path, {**base, fname: v}, 400))
        for v in (-1, 0, 10**12, 2**64, 257, 1.5, -0.5):
            c.append(js(f"{tag} max_tokens={v}", path, {**base, "max_tokens": v}, 400))
        for v in (-1, 100, 2.0001, -0.1, 1e308):
            c.append(js(f"{tag} temperature={v}", path, {**base, "temperature": v}, 400))
        for lit in ("NaN", "Infinity", "-Infinity", "1e999"):
            c.append(raw(f"{tag} temperature={lit}", path, json.dumps(base)[:-1] + f', "temperature": {lit}}}'))
        for v in (0, -0.5, 1.5, 0.0):
            c.append(js(f"{tag} top_p={v}", path, {**base, "top_p": v}, 400))
        for v in (-1, -100):
            c.append(js(f"{tag} top_k={v}", path, {**base, "top_k": v}, 400))
        for v in (2**70, -(2**70)):
            c.append(js(f"{tag} seed={v}", path, {**base, "seed": v}, 400))
        for v in (5, 0, -1, 2):
            c.append(js(f"{tag} n={v}", path, {**base, "n": v}, 400))
        for stop in (["a", "b", "c", "d", "e"], ["x" * 65], [""], "", ["ok", ""]):
            c.append(js(f"{tag} stop={str(stop)[:20]}", path, {**base, "stop": stop}, 400))
        for name, v in (("presence_penalty", 1.0), ("frequency_penalty", -1.0), ("logit_bias", {"1": 5.0})):
            c.append(js(f"{tag} unsupported {name}", path, {**base, name: v}, 400))
        c.append(js(f"{tag} unknown model", path, {**base, "model": "gpt-4"}, 404))
        c.append(js(f"{tag} empty model", path, {**base, "model": ""}, 404))
        c.append(js(f"{tag} unknown field", path, {**base, "foo": 1}, 400))
        c.append(js(f"{tag} tools", path, {**base, "tools": [{"type": "function"}]}, 400))
        c.append(js(f"{tag} missing model", path, {k: v for k, v in base.items() if k != "model"}, 400))
        c.append(js(f"{tag} empty object", path, {}, 400))
        for body in ([], [base], 1, "str", None, True):
            c.append(js(f"{tag} body={str(body)[:15]}", path, body, 400))
        for text in ("", "{", "nul", "[1,2", "{'model': 1}", '{"model": "x",}', "{}{}", '{"a" 1}', "\ufeff{}"):
            c.append(raw(f"{tag} bad json {text!r}", path, text))
        c.append(raw(f"{tag} 5000-digit int", path, json.dumps(base)[:-1] + ', "seed": ' + "9" * 5000 + "}"))
        for bad in (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"caf\xe9"):
            body = b'{"model": "' + MODEL.encode() + b'", "prompt": "' + bad + b'"}'
            c.append(raw(f"{tag} bad utf-8 {bad!r}", path, body))
        c.append(raw(f"{tag} lone surrogate", path, json.dumps(base)[:-1] + ', "user": "\\ud800"}'))
        for depth in (17, 100, 5_000, 30_000):
            c.append(raw(f"{tag} nested {depth}", path, nested(depth)))
            c.append(raw(f"{tag} nested stop {depth}", path, json.dumps(base)[:-1] + f', "stop": {nested(depth)}}}'))
        c.append(raw(f"{tag} nested objects", path, '{"a":' * 2000 + "1" + "}" * 2000))
        c.append(js(f"{tag} body over limit", path, {**base, "user": "x" * 70_000}, 413))
        c.append(Case(f"{tag} chunked body over limit", path, b"{" + b" " * 100_000 + b"}", expect=413))
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
            c.append(Case(f"{tag} content-type {ctype!r}", path, json.dumps(base).encode(),
                          headers={"content-type": ctype, **AUTH}, expect=415))
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            c.append(Case(f"{method} {path}", path, None, method=method, expect=405))
        for name, headers in (
            ("no key", {}), ("wrong key", {"Authorization": "Bearer nope"}),
            ("basic auth", {"Authorization": f"Basic {KEY}"}), ("empty bearer", {"Authorization": "Bearer"}),
        ):
            c.append(Case(f"{tag} {name}", path, json.dumps(base).encode(),
                          headers={"content-type": "application/json", **headers}, expect=401))
    cmpl = "/v1/completions"
    for prompt in ("", [], [999_999], [-1], [1.5], ["a"], [[1, 2]], None, "x" * 20_001):
        c.append(js(f"prompt={str(prompt)[:20]}", cmpl, {**COMPLETION, "prompt": prompt}, 400))
    c.append(js("prompt longer than context", cmpl, {**COMPLETION, "prompt": "a" * 600}, 400))
    c.append(js("prompt + max_tokens over context", cmpl, {**COMPLETION, "prompt": "a" * 500, "max_tokens": 20}, 400))
    c.append(js("missing prompt", cmpl, {"model": MODEL}, 400))
    for name, v in (("echo", True), ("best_of", 3), ("logprobs", 5), ("suffix", "end")):
        c.append(js(f"cmpl unsupported {name}", cmpl, {**COMPLETION, name: v}, 400))
    chat = "/v1/chat/completions"
    bad_messages = [
        [], "hi", [1], ["hi"], [[]], [{"role": "user"}], [{"content": "x"}], [{"role": "bad", "content": "x"}],
        [{"role": "tool", "content": "x"}], [{"role": "function", "content": "x"}], [{"role": "user", "content": 5}],
        [{"role": "user", "content": None}], [{"role": "User", "content": "x"}], [{"role": "", "content": "x"}],
        [{"role": "user", "content": "x", "extra": 1}], [{"role": "user", "content": [{"type": "image_url"}]}],
        [{"role": "user", "content": [{"type": "text"}]}], [{"role": "user", "content": [{"text": "x"}]}],
        [{"role": "user", "content": {"text": "x"}}], [{"role": 1, "content": "x"}],
        [{"role": "user", "content": "x" * 20_001}], [{"role": "user", "content": "x"}] * 33,
    ]
    for m in bad_messages:
        c.append(js(f"messages={str(m)[:40]}", chat, {**CHAT, "messages": m}, 400))
    c.append(js("chat long prompt over context", chat, {**CHAT, "messages": [{"role": "user", "content": "a" * 600}]}))
    c.append(js("missing messages", chat, {"model": MODEL}, 400))
    c.append(js("both token limits", chat, {**CHAT, "max_completion_tokens": 3}, 400))
    for name, v in (("logprobs", True), ("top_logprobs", 3), ("response_format", {"type": "json_object"})):
        c.append(js(f"chat unsupported {name}", chat, {**CHAT, name: v}, 400))
    for method, path, expect in (
        ("POST", "/v1/models", 405), ("POST", "/health", 405), ("GET", "/v1/nothing", 404), ("GET", "/admin", 404),
        ("POST", "/v1/embeddings", 404), ("GET", "/v1/models/../../etc/passwd", 404), ("DELETE", "/v1/models", 405),
    ):
        c.append(Case(f"{method} {path}", path, b"{}" if method == "POST" else None, method=method, expect=expect))
    return c



@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    app = create_app(
        load_model(MODEL), load_tokenizer(MODEL), model_name=MODEL, limits=LIMITS, defaults=DecodingDefaults(),
        api_key=KEY,
    )
    with serve_in_background(app) as base:
        yield base


def send(client: httpx.Client, case: Case) -> httpx.Response:
    if case.name.startswith(("cmpl chunked", "chat chunked")):
        # A generator body goes out chunked, with no Content-Length for the server to check up front.
        def chunks() -> Iterator[bytes]:
            assert case.content is not None
            for i in range(0, len(case.content), 8192):
                yield case.content[i : i + 8192]

        return client.request(case.method, case.path, content=chunks(), headers=case.headers)
    return client.request(case.method, case.path, content=case.content, headers=case.headers)


def test_corpus_of_bad_requests_gets_4xx(url):
    corpus = build_corpus()
    assert len(corpus) >= 200
    failures = []
    with httpx.Client(base_url=url, timeout=20) as client:
        for case in corpus:
            r = send(client, case)
            ok = 400 <= r.status_code < 500 and (case.expect is None or r.status_code == case.expect)
            try:
                error = r.json()["error"]
                ok = ok and isinstance(error["message"], str) and {"type", "param", "code"} <= set(error)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append(f"{case.name}: {r.status_code} {r.text[:200]}")
        assert not failures, "\n".join(failures)
        assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json=COMPLETION, headers=AUTH)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        r = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        assert r.status_code == 200


def test_too_many_concurrent_requests_get_429():
    model = load_model(MODEL)
    # Slow every forward pass down so requests overlap for certain on any machine.
    model.register_forward_hook(lambda *_: time.sleep(0.02))
    limits = ServeLimits(max_concurrent_requests=1)
    app = create_app(model, load_tokenizer(MODEL), model_name=MODEL, limits=limits, defaults=DecodingDefaults())
    body = {**COMPLETION, "max_tokens": 15, "ignore_eos": True}
    with serve_in_background(app) as base, httpx.Client(base_url=base, timeout=30) as client:
        statuses: list[int] = []
        errors: list[dict] = []

        def one() -> None:
            with httpx.Client(base_url=base, timeout=30) as own:
                r = own.post("/v1/completions", json=body)
            statuses.append(r.status_code)
            if r.status_code == 429:
                errors.append(r.json()["error"])

        threads = [threading.Thread(target=one) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(set(statuses)) == [200, 429] and statuses.count(200) >= 1
        assert all(e["code"] == "rate_limit_exceeded" and e["type"] == "rate_limit_error" for e in errors)
        # A stream holds its slot until its last chunk.
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            lines = stream.iter_lines()  # one iterator: dropping a partly read one closes the response
            assert next(lines).startswith("data: ")
            busy = client.post("/v1/completions", json=body)
            assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
            assert client.get("/health").status_code == 200  # health is never limited
            assert [line for line in lines if line][-1] == "data: [DONE]"
        assert client.post("/v1/completions", json=body).status_code == 200  # the slot is free again
        # A client that leaves mid-stream frees its slot at once and its row stops generating.
        tokens0 = app.state.engine.stats.tokens
        with client.stream("POST", "/v1/completions", json={**body, "max_tokens": 200, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ")
        time.sleep(0.2)
        assert client.post("/v1/completions", json=body).status_code == 200
        assert app.state.engine.stats.tokens - tokens0 < 200


SLOW = ServeLimits(max_concurrent_requests=4, body_timeout_s=2.0, request_timeout_s=1.5)


@pytest.fixture(scope="module")
def slow_server() -> Iterator[tuple[str, object]]:
    """A server whose every forward pass takes 20 ms more, so deadlines and disconnects land mid-generation."""
    model = load_model(MODEL)
    model.register_forward_hook(lambda *_: time.sleep(0.02))
    app = create_app(model, load_tokenizer(MODEL), model_name=MODEL, limits=SLOW, defaults=DecodingDefaults())
    with serve_in_background(app) as base:
        yield base, app


def raw_request(base: str, body: bytes, *, send_body: bool = True, declared: int | None = None) -> socket.socket:
    """Open a connection and send a POST /v1/completions head (and the body unless told not to)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
            f"content-length: {declared if declared is not None else len(body)}\r\n\r\n").encode()
    sock.sendall(head + (body if send_body else body[:5]))
    return sock


def five_xx(base: str) -> int:
    text = httpx.get(f"{base}/metrics").text
    return sum(int(float(v)) for v in re.findall(r'ppolm_serve_requests_total{[^}]*status="5\d\d"[^}]*} (\S+)', text))


def test_slow_bodies_do_not_block_a_normal_request(slow_server):
    """64 clients that never finish their upload hold no generation slot (4 here): a normal request is answered
    within its deadline, and the slow ones get 408 once the body read time runs out."""
    base, _ = slow_server
    body = json.dumps({**COMPLETION, "max_tokens": 2}).encode()
    stalled = [raw_request(base, body, send_body=False) for _ in range(64)]
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/completions", json={**COMPLETION, "max_tokens": 4}, timeout=10)
        assert r.status_code == 200 and time.monotonic() - t0 < SLOW.request_timeout_s
        statuses = []
        for sock in stalled[:8]:
            sock.settimeout(SLOW.body_timeout_s + 5)
            statuses.append(sock.recv(64).split(b" ")[1])
        assert statuses == [b"408"] * 8
    finally:
        for sock in stalled:
            sock.close()
    assert httpx.get(f"{base}/health").status_code == 200
    assert five_xx(base) == 0


def test_deadline_ends_a_request_plain_and_streamed(slow_server):
    base, app = slow_server
    body = {**COMPLETION, "max_tokens": 200, "ignore_eos": True}
    with httpx.Client(base_url=base, timeout=10) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 408 and r.json()["error"]["code"] == "deadline_exceeded"
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert lines[-1] == "data: [DONE]" and "deadline_exceeded" in lines[-2]
    time.sleep(0.1)
    assert app.state.engine.stats.running == 0
    assert five_xx(base) == 0


def test_plain_client_that_disconnects_stops_its_row(slow_server):
    base, app = slow_server
    stats = app.state.engine.stats
    tokens0 = stats.tokens
    sock = raw_request(base, json.dumps({**COMPLETION, "max_tokens": 60, "ignore_eos": True}).encode())
    time.sleep(0.3)
    assert stats.running == 1
    sock.close()
    time.sleep(0.3)
    assert stats.running == 0 and stats.tokens - tokens0 < 40  # 60 tokens would take >= 1.2 s
    text = httpx.get(f"{base}/metrics").text
    assert 'ppolm_serve_requests_total{route="/v1/completions",status="499"}' in text


def test_metrics_in_prometheus_format(slow_server):
    base, _ = slow_server
    assert httpx.post(f"{base}/v1/completions", json=COMPLETION, timeout=10).status_code == 200
    r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in ("ppolm_serve_requests_total{", "ppolm_serve_request_latency_seconds_bucket{",
                 "ppolm_serve_completion_tokens_total ", "ppolm_serve_prompt_tokens_total ",
                 "ppolm_serve_queue_depth ", "ppolm_serve_running_rows "):
        assert name in r.text, name
    ok = re.search(r'ppolm_serve_requests_total{route="/v1/completions",status="200"} (\S+)', r.text)
    assert ok and float(ok.group(1)) >= 1
