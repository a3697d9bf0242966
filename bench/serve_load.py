"""Bounded load test of `ppolm serve` on loopback: requests/s and p50/p99 latency at 1, 4 and 16 clients.

Starts the server in this process on 127.0.0.1 (a free port), sends `--requests` completions per concurrency
level (each level also stops at `--time-cap` seconds), prints one row per level, then shuts the server down.
Requests use `ignore_eos`, so every completion has exactly `--max-tokens` tokens and levels are comparable.

    python bench/serve_load.py                       # tiny-random-llama, levels 1 4 16
    python bench/serve_load.py --model smollm2-135m-instruct --requests 32 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
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
    ok: int  # 200 responses
    failed: int  # anything else (should be 0)
    seconds: float
    p50_ms: float
    p99_ms: float
    tokens: int  # completion tokens received
    batches: int  # engine batches run during the level
    rows: int  # requests served by those batches

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0 for an empty list."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run_level(url: str, app: FastAPI, clients: int, requests: int, time_cap: float, body: dict) -> LevelResult:
    """Send `requests` completions from `clients` concurrent workers, stopping early at `time_cap` seconds."""
    stats = app.state.engine.stats
    batches0, rows0 = stats.batches, stats.rows
    latencies: list[float] = []
    failed = tokens = 0
    issued = 0
    start = time.perf_counter()
    deadline = start + time_cap
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=max(time_cap, 30.0), limits=limits) as client:

        async def worker() -> None:
            nonlocal failed, tokens, issued
            while issued < requests and time.perf_counter() < deadline:
                issued += 1
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json={**body, "seed": issued})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    tokens += r.json()["usage"]["completion_tokens"]
                else:
                    failed += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - start
    return LevelResult(
        clients=clients,
        ok=len(latencies),
        failed=failed,
        seconds=seconds,
        p50_ms=1000 * statistics.median(latencies) if latencies else 0.0,
        p99_ms=1000 * percentile(latencies, 0.99),
        tokens=tokens,
        batches=stats.batches - batches0,
        rows=stats.rows - rows0,
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
    body = {"model": "bench", "prompt": args.prompt, "max_tokens": args.max_tokens, "ignore_eos": True}
    results = []
    with serve_in_background(app) as url:
        httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 2}, timeout=60)  # warm-up
        print(
            f"model={args.model} requests/level={args.requests} max_tokens={args.max_tokens} "
            f"torch_threads={torch.get_num_threads()} url={url}"
        )
        header = ("clients", "ok", "fail", "req/s", "tok/s", "p50 ms", "p99 ms", "rows/batch")
        print(" ".join(f"{h:>{w}}" for h, w in zip(header, (7, 4, 4, 7, 8, 8, 8, 10), strict=True)))
        for clients in levels:
            r = asyncio.run(run_level(url, app, clients, args.requests, args.time_cap, body))
            results.append(r)
            per_batch = r.rows / r.batches if r.batches else 0.0
            print(
                f"{r.clients:>7} {r.ok:>4} {r.failed:>4} {r.rps:>7.1f} {r.tokens / r.seconds:>8.0f} "
                f"{r.p50_ms:>8.1f} {r.p99_ms:>8.1f} {per_batch:>10.2f}"
            )
    return results


if __name__ == "__main__":
    main()
