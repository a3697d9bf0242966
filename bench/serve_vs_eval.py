"""`ppolm serve` against `ppolm eval` on one export: the pipeline's held-out rows, greedy, must get the same
completions and so the same labels from both.

Loads the export once, runs `evaluate` (what `ppolm eval` runs) on the held-out rows the pipeline config names
(its data, eval_fraction, seed and eval limit: the test split of `ppolm run`), then asks the served export the
same rows through the chat route with the export's own decoding defaults (ppolm_decoding.json: temperature 0,
max tokens, system prompt), 8 requests in flight so they share the continuous batch. The server is the app
`ppolm serve` runs, started in this process, or an already running one given with --url. Both sides run in fp32
(eval without autocast), so a disagreement is a serving bug, not bf16 rounding at a near tie. Prints the
agreement and each differing row; exits 1 when any completion or label differs.

    python bench/serve_vs_eval.py runs/demo/export                          # configs/pipeline-demo.yaml's split
    python bench/serve_vs_eval.py runs/demo/export --limit 32
    python bench/serve_vs_eval.py runs/demo/export --url http://127.0.0.1:8000   # PPOLM_API_KEY if it needs one
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppolm.config import load_config  # noqa: E402
from ppolm.eval.metrics import label_from_completion  # noqa: E402
from ppolm.eval.run import evaluate, spread  # noqa: E402
from ppolm.pipeline import PipelineConfig  # noqa: E402
from ppolm.serve import ServeLimits, create_app, load_served, serve_in_background  # noqa: E402
from ppolm.tasks import Example, Task, build_task  # noqa: E402
from ppolm.trainers.common import split_held_out  # noqa: E402


def held_out(cfg: PipelineConfig, task: Task, limit: int | None) -> list[Example]:
    """The pipeline's test split: eval_data, or eval_fraction of the data split off with the run's seed."""
    if cfg.task.eval_data:
        held = task.load_all(cfg.task.eval_data)
    else:
        held = split_held_out(task.load_all(cfg.task.data), cfg.task.eval_fraction, cfg.seed)[1]
    return spread(held, limit or cfg.eval.limit or cfg.task.eval_limit)


async def ask(url: str, model_name: str, rows: list[Example], api_key: str | None) -> list[str]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    gate = asyncio.Semaphore(8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:

        async def one(ex: Example) -> str:
            async with gate:
                body = {"model": model_name, "messages": [{"role": "user", "content": ex.prompt}]}
                r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        return list(await asyncio.gather(*(one(ex) for ex in rows)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", help="the exported model directory, e.g. runs/demo/export")
    ap.add_argument("--config", default=str(ROOT / "configs/pipeline-demo.yaml"), help="pipeline config of the run")
    ap.add_argument("--limit", type=int, default=None, help="rows (evenly spread); default: the config's eval limit")
    ap.add_argument("--url", default=None, help="a running `ppolm serve` of this export; default: serve it here")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args()

    cfg = load_config(PipelineConfig, args.config)
    task = build_task(cfg.task.name, cfg.task.options)
    rows = held_out(cfg, task, args.limit)
    model, tokenizer, served, defaults = load_served(args.export, device=args.device, precision="fp32")
    if defaults.temperature != 0.0:
        print(f"note: the export samples at temperature {defaults.temperature}; served answers will differ")
    result = evaluate(task, model, tokenizer, rows, batch_size=cfg.eval.batch_size, autocast=None,
                      label_scores=False)
    expected = [p["completion"] for p in result.predictions]
    if args.url:
        answers = asyncio.run(ask(args.url, served, rows, os.environ.get("PPOLM_API_KEY")))
    else:
        app = create_app(model, tokenizer, model_name=served, limits=ServeLimits(), defaults=defaults)
        with serve_in_background(app) as url:
            answers = asyncio.run(ask(url, served, rows, None))

    labels = task.label_words(rows) or []
    differ = 0
    for i, (ex, want, got) in enumerate(zip(rows, expected, answers, strict=True)):
        want_label, got_label = label_from_completion(want, labels), label_from_completion(got, labels)
        if want != got or want_label != got_label:
            differ += 1
            print(f"row {i} ({ex.source}:{ex.line}): eval {want_label!r} {want!r} | serve {got_label!r} {got!r}")
    same_labels = sum(label_from_completion(a, labels) == label_from_completion(b, labels)
                      for a, b in zip(expected, answers))
    print(f"{len(rows)} held-out rows of {args.config}: {len(rows) - differ} identical completions, "
          f"{same_labels} identical labels; eval accuracy {result.metrics.get('accuracy')}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
