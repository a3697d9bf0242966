"""Evaluation runs: generate for every example of a task, score, and write metrics and predictions.

``evaluate`` decodes the task's prompts in batches with ``ppolm.rollout.generate`` (greedy by default:
temperature 0 from the task's ``Decoding``), then asks the task for its metrics. Two optional task hooks
add model-based scores:

* ``task.label_words(examples)`` (classification): each label word is scored as the answer
  (``ppolm.eval.labels``), giving label probabilities (B, C) -> ROC-AUC and ``prob_accuracy``;
* ``task.needs_reference_scores`` (generation): per sequence, KL(pi || pi_ref) summed over the generated
  tokens with the full next-token distributions, and the reference model's NLL of the completion -> KL mean
  and perplexity. Without a reference model the evaluated model is its own reference (KL = 0).

``eval_command`` / ``generate_command`` are the ``ppolm eval`` / ``ppolm generate`` subcommands.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ppolm.data.collate import apply_chat_template, left_pad_collate
from ppolm.eval.intervals import mean_se, metric_se
from ppolm.eval.labels import label_logprobs, label_probabilities
from ppolm.models.policy import autocast_ctx, lm_logits_fp32, response_hidden
from ppolm.rollout import generate
from ppolm.sampling import row_uniforms
from ppolm.tasks.base import Decoding, Example, Task
from ppolm.types import Rollout


@dataclass
class EvalResult:
    """metrics: the task's metrics plus run facts (n, seconds, tokens); predictions: one dict per example
    (prompt, completion, reference, reward, scores, source, line), in the order of the examples."""

    metrics: dict[str, Any]
    predictions: list[dict[str, Any]]


@torch.no_grad()
def sequence_kl_and_nll(
    model: PreTrainedModel, reference: PreTrainedModel | None, rollout: Rollout, autocast: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence: KL along the generated path, the reference's NLL of the completion, token count.

    KL_b = sum_t m_bt * sum_v pi(v | s_bt) (log pi(v | s_bt) - log pi_ref(v | s_bt))   (exact per-token KL,
    not the sampled log-ratio, so it is meaningful for greedy decoding too);
    NLL_b = -sum_t m_bt log pi_ref(y_bt | s_bt); tokens_b = sum_t m_bt.  All (B,) fp32.
    ``reference=None`` means the model is its own reference: KL = 0 and NLL under the model.
    """
    ids, attn, resp, mask = rollout.input_ids, rollout.attention_mask, rollout.response_ids, rollout.response_mask
    R = resp.shape[1]

    def logprobs(m: PreTrainedModel) -> torch.Tensor:
        with autocast_ctx(autocast, ids.device):
            hidden = response_hidden(m, ids, attn, R)
        return torch.log_softmax(lm_logits_fp32(m, hidden), dim=-1)  # (B, R, V)

    logp = logprobs(model)
    ref = logp if reference is None else logprobs(reference)
    kl = (logp.exp() * (logp - ref)).sum(-1) if reference is not None else torch.zeros_like(mask)
    nll = -ref.gather(-1, resp.unsqueeze(-1)).squeeze(-1)
    return (kl * mask).sum(-1).cpu(), (nll * mask).sum(-1).cpu(), mask.sum(-1).cpu()


def task_rewards(task: Task, prompts: list[str], completions: list[str], examples: Sequence[Example]) -> list[float]:
    """sum_k w_k r_k(prompts, completions, **row fields) over the task's weighted reward functions, (B,)."""
    rows = task.row_fields(examples)
    total = [0.0] * len(completions)
    for fn, weight in task.reward_functions():
        for i, value in enumerate(fn(prompts, completions, **rows)):
            total[i] += weight * float(value)
    return total


@dataclass
class Completions:
    """Decoded completions of B prompts in input order: text, ended (EOS or stop string), response tokens;
    with reference scores also per-sequence KL, reference NLL and token counts (see sequence_kl_and_nll)."""

    texts: list[str]
    ended: list[bool]
    lengths: list[int]
    kls: list[float] | None = None
    ref_nll: list[float] | None = None
    ref_tokens: list[int] | None = None


def complete(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: Sequence[list[int]],
    decoding: Decoding,
    *,
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
    seed: int = 0,
    reference_scores: bool = False,
    reference_model: PreTrainedModel | None = None,
    progress: bool = False,
) -> Completions:
    """Decode every prompt (token id lists, chat template already applied) with ``decoding``.

    Batches hold prompts of similar length (less left padding); row i's sampling noise comes from
    ``row_uniforms(seed, 0, [i])``, so a completion does not depend on the batch split.
    progress: a tqdm bar over the prompts (the CLI commands and the pipeline turn it on).
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = len(prompt_ids)
    order = sorted(range(n), key=lambda i: len(prompt_ids[i]))
    res = Completions([""] * n, [False] * n, [0] * n)
    if reference_scores:
        res.kls, res.ref_nll, res.ref_tokens = [0.0] * n, [0.0] * n, [0] * n
    model.eval()
    bar = tqdm(total=n, desc="generate", unit="row", dynamic_ncols=True, disable=not progress)
    for lo in range(0, n, batch_size):
        idx = order[lo: lo + batch_size]
        x, m = left_pad_collate([list(prompt_ids[i]) for i in idx], pad)
        out = generate(
            model, tokenizer, x.to(device), m.to(device), row_uniforms(seed, 0, idx, decoding.max_new_tokens),
            max_new_tokens=decoding.max_new_tokens, temperature=decoding.temperature, top_k=decoding.top_k,
            top_p=decoding.top_p, stop=list(decoding.stop), autocast_dtype=autocast,
        )
        for j, i in enumerate(idx):
            res.texts[i], res.ended[i], res.lengths[i] = out.completions[j], bool(out.ended[j]), int(out.response_mask[j].sum())
        if reference_scores:
            kl, nll, tok = sequence_kl_and_nll(model, reference_model, out, autocast)
            for j, i in enumerate(idx):
                res.kls[i], res.ref_nll[i], res.ref_tokens[i] = float(kl[j]), float(nll[j]), int(tok[j])
        bar.update(len(idx))
    bar.close()
    return res


def evaluate(
    task: Task,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    decoding: Decoding | None = None,
    autocast: torch.dtype | None = None,
    reference_model: PreTrainedModel | None = None,
    seed: int = 0,
    label_scores: bool = True,
    progress: bool = False,
    se_metrics: Sequence[str] = (),
) -> EvalResult:
    """Generate a completion per example (chat template + ``task.system_prompt``) and compute metrics.

    Reward = the task's weighted reward functions on the templated prompts, as PPO computes it. Metrics
    add n, eos_rate, response_tokens_mean, seconds (wall time of the whole evaluation) and
    generation_seconds (the decoding part, KL / perplexity included; the rest is label scoring and metrics).
    ``label_scores=False`` skips the label-word probabilities (no ROC-AUC): evaluations during training only
    need the decoded answers. ``se_metrics``: metrics whose standard error is added as ``<metric>_se``
    (``ppolm.eval.intervals.metric_se``: binomial for accuracy, bootstrap otherwise).
    """
    if not examples:
        raise ValueError("evaluate needs at least one example")
    t0 = time.perf_counter()
    texts = [apply_chat_template(tokenizer, ex.prompt, task.system_prompt) for ex in examples]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    want_ref = bool(getattr(task, "needs_reference_scores", False))
    gen = complete(model, tokenizer, ids, decoding or task.decoding, batch_size=batch_size, autocast=autocast,
                   seed=seed, reference_scores=want_ref, reference_model=reference_model, progress=progress)
    n, completions = len(examples), gen.texts
    t_gen = time.perf_counter() - t0
    extra: dict[str, Any] = {}
    label_words = getattr(task, "label_words", None)
    words = label_words(examples) if callable(label_words) and label_scores else None
    if words:
        order = sorted(range(n), key=lambda i: len(ids[i]))  # similar lengths side by side: less padding
        lp = label_logprobs(model, tokenizer, [ids[i] for i in order], words, batch_size=batch_size,
                            autocast_dtype=autocast)
        probs = torch.empty_like(lp)
        probs[torch.tensor(order)] = label_probabilities(lp)
        extra["label_probs"] = probs.tolist()
    rewards = task_rewards(task, texts, completions, examples)
    if want_ref:
        extra.update(kls=gen.kls, ref_nll=gen.ref_nll, ref_tokens=gen.ref_tokens, rewards=rewards)
    metrics = dict(task.metrics(examples, completions, **extra))
    metrics.setdefault("reward_mean", sum(rewards) / n)
    for name in se_metrics:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # reward_mean is the mean of the per-row rewards: its se is theirs, no resampling needed
            se = (mean_se(rewards) if name == "reward_mean" else
                  metric_se(task, examples, completions, name, float(value), extra, seed=seed))
            if se is not None:
                metrics[f"{name}_se"] = se
    metrics.update(n=n, eos_rate=sum(gen.ended) / n, response_tokens_mean=sum(gen.lengths) / n,
                   seconds=time.perf_counter() - t0, generation_seconds=t_gen)
    scores_fn = getattr(task, "example_scores", None)
    per_example = scores_fn(examples, completions, **extra) if callable(scores_fn) else [{}] * n
    predictions = [
        {"prompt": ex.prompt, "completion": c, "reference": ex.reference, "reward": r, "scores": s,
         "source": ex.source, "line": ex.line}
        for ex, c, r, s in zip(examples, completions, rewards, per_example)
    ]
    return EvalResult(metrics, predictions)


def spread(items: Sequence[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` items evenly spaced over ``items`` (index floor(k * n / limit)), in order.

    Data files are often sorted by class (IMDB: all negatives first) or by length (Tatoeba), so the first
    N rows would be a biased sample; an even spread is deterministic and covers the whole file.
    """
    n = len(items)
    if limit is None or limit >= n:
        return list(items)
    return [items[k * n // limit] for k in range(limit)]


# ---- command line -----------------------------------------------------------------------------------------


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["label_names={1: World}", "max_words=100"]`` -> dict; values are YAML scalars, {...} or [...]."""
    import yaml

    from ppolm.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        raw = value.strip()
        try:
            parsed = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            if raw.startswith(("{", "[")):
                raise ConfigError(f"--option {key}: value is not valid YAML ({str(exc).splitlines()[0]})") from None
            parsed = value
        # Only an explicit {...} / [...] makes a mapping or list ("Entities: {text}" stays a string), and
        # only true/false make a boolean (YAML 1.1 would turn "yes"/"on" into True).
        if isinstance(parsed, (dict, list)) and not raw.startswith(("{", "[")):
            parsed = value
        if isinstance(parsed, bool) and raw.lower() not in ("true", "false"):
            parsed = value
        out[key.strip()] = parsed
    return out


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load(name: str, device: torch.device):
    from ppolm.models import load_model, load_tokenizer

    model = load_model(name).to(device)
    model.requires_grad_(False)
    model.eval()
    return model, load_tokenizer(name)


def eval_command(args: argparse.Namespace) -> int:
    """``ppolm eval``: metrics.json, predictions.jsonl and a table for --model on --task (--data or demo).

    ``--limit N`` takes N rows evenly spread over the file (see ``spread``), not the first N.
    """
    from ppolm.errors import ConfigError
    from ppolm.runtime import autocast_dtype
    from ppolm.tasks import build_task

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = parse_options(args.option)
    task = build_task(args.task, options)  # options are checked before any model loads
    examples = spread(task.load(args.data), args.limit)
    device = _device()
    model, tokenizer = _load(args.model, device)
    ref_name = getattr(task.options, "reference_model", None)
    reference = _load(ref_name, device)[0] if ref_name and ref_name != args.model else None
    amp = autocast_dtype("auto", device)
    result = evaluate(task, model, tokenizer, examples, batch_size=args.batch_size, autocast=amp,
                      reference_model=reference, progress=True)
    out_dir = Path(args.output_dir or f"runs/eval-{task.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    run = {"task": args.task, "model": args.model, "data": args.data or "demo", "limit": args.limit,
           "options": options, "decoding": asdict(task.decoding),
           "autocast": str(amp).replace("torch.", "") if amp else "fp32", "device": str(device)}
    with open(out_dir / "metrics.json", "w", encoding="utf-8") as f:
        json.dump({**result.metrics, "run": run}, f, indent=2, ensure_ascii=False, default=str)
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row in result.predictions:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    print(f"{task.name} | model {args.model} | data {args.data or 'demo'} | {len(examples)} examples")
    print(format_table(result.metrics))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.jsonl'}")
    return 0


def format_table(metrics: dict[str, Any]) -> str:
    """Scalars as 'name  value' lines, then per-class / per-type P/R/F1 and the confusion matrix."""
    lines = []
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"  {key:24s} {shown}")
    for group in ("per_class", "per_type"):
        table = metrics.get(group)
        if isinstance(table, dict) and table:
            width = max(12, *(len(str(k)) for k in table))
            lines.append(f"  {group:{width}s} {'precision':>9s} {'recall':>7s} {'f1':>7s} {'support':>8s}")
            for name, row in table.items():
                lines.append(f"  {name:{width}s} {row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:7.3f} "
                             f"{row['support']:8d}")
    matrix, labels = metrics.get("confusion_matrix"), metrics.get("labels")
    if matrix and labels:
        width = max(8, *(len(str(lab)) for lab in labels))
        lines.append("  confusion (rows: true, columns: predicted; invalid answers not shown)")
        lines.append("  " + " " * width + "".join(f" {lab!s:>{width}s}" for lab in labels))
        for lab, row in zip(labels, matrix):
            lines.append(f"  {lab!s:{width}s}" + "".join(f" {v:>{width}d}" for v in row))
    return "\n".join(lines)


def generate_command(args: argparse.Namespace) -> int:
    """``ppolm generate``: one completion per prompt of --input, written as JSONL (prompt, completion, line).

    A record's ``prompt`` field is sent as it is; a ``text`` field (or a .txt line) goes through the task's
    ``format_prompt`` when --task is given. Decoding: the task's settings (else greedy, 128 new tokens),
    overridden by --max-new-tokens / --temperature.
    """
    from ppolm.data.readers import missing_reason, read_records
    from ppolm.errors import ConfigError, DataError
    from ppolm.runtime import autocast_dtype
    from ppolm.tasks import build_task

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    task = build_task(args.task, {}) if args.task else None
    decoding = task.decoding if task is not None else Decoding(max_new_tokens=128, temperature=0.0)
    overrides = {k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature))
                 if v is not None}
    if not (overrides.get("max_new_tokens", 1) >= 1 and 0.0 <= overrides.get("temperature", 0.0) <= 10.0):
        raise ConfigError("--max-new-tokens must be >= 1 and --temperature a number in [0, 10]")
    decoding = replace(decoding, **overrides)
    path = Path(args.input)
    records = read_records(path)
    names = list(dict.fromkeys(k for rec in records[:50] for k in rec.fields))
    field = next((n for n in ("prompt", "text") if n in names), None)
    if field is None:
        raise DataError(path, records[0].line, "prompt", missing_reason("prompt", names))
    fmt = getattr(task, "format_prompt", None) if field == "text" else None
    prompts = []
    for rec in records:
        value = rec.fields.get(field)
        if not isinstance(value, str) or not value.strip():
            raise DataError(rec.source, rec.line, field, "expected a non-empty string")
        prompts.append(fmt(value) if callable(fmt) else value)
    device = _device()
    model, tokenizer = _load(args.model, device)
    system = task.system_prompt if task is not None else None
    ids = [tokenizer(apply_chat_template(tokenizer, p, system), add_special_tokens=False)["input_ids"] for p in prompts]
    t0 = time.perf_counter()
    out = complete(model, tokenizer, ids, decoding, batch_size=args.batch_size, autocast=autocast_dtype("auto", device),
                   progress=True)
    output = Path(args.output) if args.output else path.with_suffix(".completions.jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
        for rec, prompt, text, ended in zip(records, prompts, out.texts, out.ended):
            f.write(json.dumps({"prompt": prompt, "completion": text, "ended": ended, "line": rec.line},
                               ensure_ascii=False) + "\n")
    print(f"wrote {len(prompts)} completions to {output} ({time.perf_counter() - t0:.1f} s)")
    return 0
