"""Bounded load test of `ppolm serve` on loopback: tokens/s, p50/p95 latency and time to first token (TTFT)
at 1, 4 and 16 concurrent streaming clients, and the continuous-batching targets checked against them.

Starts the server in this process on 127.0.0.1 (a free port), sends `--requests` streamed completions per
concurrency level (each level also stops at `--time-cap` seconds), prints one row per level, then the targets:
tokens/s at the highest level >= 3x tokens/s at 1 client, and TTFT p95 at the highest level below the p50
latency of one whole request at 1 client. Requests use `ignore_eos`, so every completion has exactly
`--max-tokens` tokens and levels are comparable.

    python bench/serve_load.py                       # tiny-random-llama, levels 1 4 16
    python bench/serve_load.py --model smollm2-135m-instruct --requests 32 --max-tokens 64 --torch-threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

import httpx
import torch
from fastapi import FastAPI

from ppolm.models import load_model, load_tokenizer
from ppolm.serve import DecodingDefaults, ServeLimits, create_app, serve_in_background


@dataclass(frozen=True)
class LevelResult:
    """Outcome of one concurrency level."""

    clients: int
    ok: int  # complete streams ([DONE] after a finish_reason)
    failed: int  # anything else (should be 0)
    seconds: float
    p50_ms: float  # whole-request latency
    p95_ms: float
    ttft_p50_ms: float  # time to the first streamed token
    ttft_p95_ms: float
    tokens: int  # completion tokens received (usage of each stream)
    prefills: int  # engine prefill passes during the level
    max_rows: int  # most rows decoding together (since the server started)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for an empty list."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def one_stream(client: httpx.AsyncClient, body: dict) -> tuple[float, float, int] | None:
    """(latency s, time to first token s, completion tokens) of one streamed completion; None if it failed."""
    t0 = time.perf_counter()
    first = None
    tokens = 0
    done = False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk.get("choices") and chunk["choices"][0]["text"]:
                first = time.perf_counter() - t0
    if not done or not tokens:
        return None
    return time.perf_counter() - t0, first if first is not None else time.perf_counter() - t0, tokens


async def run_level(url: str, app: FastAPI, clients: int, requests: int, time_cap: float, body: dict) -> LevelResult:
    """Send `requests` streamed completions from `clients` concurrent workers, stopping early at `time_cap` s."""
    stats = app.state.engine.stats
    prefills0 = stats.batches
    latencies: list[float] = []
    ttfts: list[float] = []
    failed = tokens = 0
    issued = 0
    start = time.perf_counter()
    deadline = start + time_cap
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=max(time_cap, 60.0), limits=limits) as client:

        async def worker() -> None:
            nonlocal failed, tokens, issued
            while issued < requests and time.perf_counter() < deadline:
                issued += 1
                out = await one_stream(client, {**body, "seed": issued})
                if out is None:
                    failed += 1
                    continue
                latencies.append(out[0])
                ttfts.append(out[1])
                tokens += out[2]

        await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - start
    return LevelResult(
        clients=clients,
        ok=len(latencies),
        failed=failed,
        seconds=seconds,
        p50_ms=1000 * percentile(latencies, 0.5),
        p95_ms=1000 * percentile(latencies, 0.95),
        ttft_p50_ms=1000 * percentile(ttfts, 0.5),
        ttft_p95_ms=1000 * percentile(ttfts, 0.95),
        tokens=tokens,
        prefills=stats.batches - prefills0,
        max_rows=stats.max_batch_rows,
    )


def main(argv: list[str] | None = None) -> list[LevelResult]:
    """Parse arguments, serve the model on loopback, run each level, print the table; return the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-random-llama", help="model name or exported directory")
    p.add_argument("--levels", default="1,4,16", help="comma-separated concurrent client counts")
    p.add_argument("--requests", type=int, default=48, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request")
    p.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    p.add_argument("--time-cap", type=float, default=30.0, help="seconds per level at most")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument(
        "--torch-threads", type=int, default=0,
        help="torch intra-op threads (0 = torch's default); 1 is much faster on a CPU shared with other jobs",
    )
    args = p.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    levels = [int(x) for x in args.levels.split(",")]

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    limits = ServeLimits(max_batch_size=args.max_batch_size, max_concurrent_requests=max(64, max(levels)))
    app = create_app(model, tokenizer, model_name="bench", limits=limits, defaults=DecodingDefaults())
    body = {"model": "bench", "prompt": args.prompt, "max_tokens": args.max_tokens, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    results = []
    with serve_in_background(app) as url:
        httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2, "stream": False}, timeout=60)  # warm-up
        print(
            f"model={args.model} requests/level={args.requests} max_tokens={args.max_tokens} "
            f"torch_threads={torch.get_num_threads()} url={url}"
        )
        header = ("clients", "ok", "fail", "tok/s", "p50 ms", "p95 ms", "ttft p50", "ttft p95", "prefills")
        widths = (7, 4, 4, 8, 8, 8, 9, 9, 9)
        print(" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True)))
        for clients in levels:
            r = asyncio.run(run_level(url, app, clients, args.requests, args.time_cap, body))
            results.append(r)
            print(
                f"{r.clients:>7} {r.ok:>4} {r.failed:>4} {r.tokens_per_s:>8.1f} {r.p50_ms:>8.0f} {r.p95_ms:>8.0f} "
                f"{r.ttft_p50_ms:>9.0f} {r.ttft_p95_ms:>9.0f} {r.prefills:>9}"
            )
        print(f"max rows decoding together: {app.state.engine.stats.max_batch_rows}")
    if len(results) > 1 and results[0].clients == 1:
        one, top = results[0], results[-1]
        speedup = top.tokens_per_s / one.tokens_per_s if one.tokens_per_s else 0.0
        print(f"throughput {top.clients} vs 1 client: {speedup:.2f}x (target >= 3x: {'met' if speedup >= 3 else 'NOT met'})")
        met = top.ttft_p95_ms < one.p50_ms
        print(f"TTFT p95 at {top.clients}: {top.ttft_p95_ms:.0f} ms vs one whole request at 1 client: {one.p50_ms:.0f} ms "
              f"(target below: {'met' if met else 'NOT met'})")
    return results


if __name__ == "__main__":
    main()
