"""Compressed exports side by side: decode tokens/s and held-out accuracy of fp32, bf16 and int8 model directories.

Each directory comes from `ppolm export --model M --output D --quantize {none,bf16,int8}`. For each, one run:
accuracy of the classification task on `--limit` demo reviews spread over the file (`ppolm eval`'s examples),
then greedy decoding of exactly `--tokens` tokens at batch 1 for `--prompts` prompts (tokens/s).

    python bench/precision.py fp32=runs/x-none bf16=runs/x-bf16 int8=runs/x-int8 --torch-threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from ppolm.eval.run import evaluate, spread
from ppolm.models import load_model, load_tokenizer
from ppolm.tasks import build_task

PRECISION = {"fp32": "fp32", "bf16": "bf16", "int8": "fp32"}  # int8 weights, fp32 activations


def decode_tokens_per_s(model, tokenizer, prompts: list[str], tokens: int) -> float:
    """Greedy decoding of exactly `tokens` new tokens per prompt, one prompt at a time: generated tokens / s."""
    total = 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        total += time.perf_counter() - t0
    return tokens * len(prompts) / total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="LABEL=DIR with LABEL in fp32, bf16, int8")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--torch-threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    task = build_task("classification", {})
    examples = spread(task.load(None), args.limit)
    prompts = [e.prompt for e in examples[: args.prompts]]
    print(f"{'variant':8s} {'accuracy':>9s} {'decode tok/s':>13s} {'eval s':>7s}")
    for item in args.variants:
        label, _, path = item.partition("=")
        model = load_model(path, precision=PRECISION[label]).eval()
        tokenizer = load_tokenizer(path)
        t0 = time.perf_counter()
        result = evaluate(task, model, tokenizer, examples, batch_size=16)
        eval_s = time.perf_counter() - t0
        tps = decode_tokens_per_s(model, tokenizer, prompts, args.tokens)
        print(f"{label:8s} {result.metrics['accuracy']:>9.3f} {tps:>13.1f} {eval_s:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
