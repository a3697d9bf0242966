"""The `ppolm` command line: one subcommand per stage of the flow.

Every training command takes `--config FILE` plus dotted `key=value` overrides; the config is validated
before any model loads. Exit codes (a traceback only with --debug):
  0 success; 2 bad input (usage, config, data file, model name, checkpoint); 3 training aborted because it
  diverged (non-finite gradients K steps in a row); 130 interrupted (Ctrl-C, after the emergency checkpoint).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any

from ppolm.errors import PpolmError

# subcommand -> (config class, run function, one-line help)
CONFIG_COMMANDS = {
    "ppo": ("ppolm.config:PPORunConfig", "ppolm.trainers.ppo:train_ppo", "PPO fine-tuning (RLHF-style)"),
    "sft": ("ppolm.trainers.sft:SFTRunConfig", "ppolm.trainers.sft:train_sft", "supervised fine-tuning"),
    "rm": ("ppolm.trainers.rm:RMRunConfig", "ppolm.trainers.rm:train_rm", "reward-model training from preference pairs"),
    "dpo": ("ppolm.trainers.dpo:DPORunConfig", "ppolm.trainers.dpo:train_dpo",
            "DPO (or IPO) of the policy on preference pairs, no reward model"),
    "run": ("ppolm.pipeline:PipelineConfig", "ppolm.pipeline:run_pipeline",
            "the whole flow: preprocess, train (SFT and/or PPO), evaluate, adjust, export, report; with "
            "`flow: rlhf`, the RLHF flow (reward model, best-of-n, SFT, DPO, PPO side by side)"),
}


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _add_config_command(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("config_file", nargs="?", help="YAML config (same as --config)")
    p.add_argument("--config", "-c", dest="config", help="YAML config file")
    p.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. ppo.clip_eps=0.1")
    p.add_argument("--describe", action="store_true", help="list every config key with its default and meaning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppolm", description="PPO fine-tuning for language models.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in CONFIG_COMMANDS.items():
        _add_config_command(sub, name, help_text)

    ev = sub.add_parser("eval", help="evaluate a model on a task: metrics.json, predictions.jsonl, a table")
    ev.add_argument("--task", required=True)
    ev.add_argument("--model", default="smollm2-135m-instruct")
    ev.add_argument("--data", default=None, help="data file (default: the task's shipped demo data)")
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--output-dir", default=None)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option")

    gen = sub.add_parser("generate", help="write completions for prompts in a file")
    gen.add_argument("--model", default="smollm2-135m-instruct")
    gen.add_argument("--input", required=True, help="JSONL/CSV/TSV with a 'prompt' (or 'text') field, or .txt lines")
    gen.add_argument("--output", default=None, help="output JSONL (default: INPUT.completions.jsonl)")
    gen.add_argument("--task", default=None, help="use this task's prompt format and decoding settings")
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--batch-size", type=int, default=8)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    srv.add_argument("--model", default="smollm2-135m-instruct")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None,
                     help="require this Bearer key (prefer the PPOLM_API_KEY environment variable: flags show in ps)")
    srv.add_argument("--max-concurrent", type=int, default=None, help="429 past this many requests in flight")
    srv.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                     help="dtype of the float weights (an int8 export keeps its int8 weights)")

    exp = sub.add_parser("export", help="a serving-ready model directory: LoRA merged, weights fp32/bf16/int8")
    exp.add_argument("--model", required=True, help="model name, exported/final directory or LoRA adapter directory")
    exp.add_argument("--output", required=True,
                     help="output directory: new or empty (never the source, inside it or containing it)")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace a non-empty --output (atomically, once the new export is complete)")
    exp.add_argument("--quantize", default="none", choices=["none", "bf16", "int8"],
                     help="int8 = torchao weight-only int8 (the quant extra)")

    data = sub.add_parser("data", help="data preprocessing tools")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    chk = dsub.add_parser("check", help="validate a data file and print its statistics")
    chk.add_argument("file")
    chk.add_argument("--task", default=None, choices=["classification", "ner", "translation", "generation"])
    chk.add_argument("--format", default=None)
    chk.add_argument("--columns", default=None, help="comma-separated column names for a headerless file")
    chk.add_argument("--target", default=None, help="target-language file for line-aligned translation data")
    chk.add_argument("--tokenizer", default=None, help="model name whose tokenizer gives token lengths")

    sub.add_parser("models", help="list the models that can be loaded here")

    pl = sub.add_parser("plan", help="predicted peak memory of a PPO config per process and layout, and the fastest "
                        "settings that fit (model configs only, no weights)")
    pl.add_argument("config", nargs="?", help="PPO YAML config")
    pl.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")
    pl.add_argument("--launch", default=None, help="accelerate config file of the launch (default: 1 process)")
    pl.add_argument("--memory", default=None, help="memory per process, e.g. 24GiB, 500MiB or bytes "
                    "(default: what this machine has available)")
    pl.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="plan for this device kind")
    pl.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt width (default: the longest prompt of the config's training data)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _run_config_command(args: argparse.Namespace) -> int:
    cls_path, fn_path, _ = CONFIG_COMMANDS[args.command]
    from ppolm.config import describe, load_config

    config_path = args.config or args.config_file
    if args.config_file and args.config and args.config_file != args.config:
        args.overrides.insert(0, args.config_file)
        config_path = args.config
    if config_path and "=" in config_path and not args.config:
        args.overrides.insert(0, config_path)
        config_path = None
    if args.command == "run":  # `flow: rlhf` in the file (or flow=rlhf) selects the RLHF flow's config
        from ppolm.rlhf.config import requested_flow

        if requested_flow(config_path, args.overrides) == "rlhf":
            cls_path, fn_path = "ppolm.rlhf.config:RLHFConfig", "ppolm.rlhf.run:run_rlhf"
    cls = _load(cls_path)
    if args.describe:
        for key, default, doc in describe(cls):
            print(f"{key:34s} {default:24s} {doc}")
        return 0
    cfg = load_config(cls, config_path, args.overrides)
    result = _load(fn_path)(cfg)
    if isinstance(result, dict):
        headline = {k: v for k, v in result.items() if isinstance(v, (int, float))}
        if headline and os.environ.get("RANK", "0") == "0":  # once per launch, not once per process
            print("final: " + ", ".join(f"{k}={v:.4g}" for k, v in list(headline.items())[:8]))
    return 0


def _run_data_check(args: argparse.Namespace) -> int:
    from ppolm.data.check import check_file

    tokenizer = None
    if args.tokenizer:
        from ppolm.models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    columns = args.columns.split(",") if args.columns else None
    report = check_file(args.file, task=args.task, tokenizer=tokenizer, columns=columns, format=args.format,
                        target=args.target)
    print(report.format())
    return 0


def _run_models() -> int:
    from ppolm.models import available_models

    rows = available_models()
    width = max(len(r[0]) for r in rows)
    for name, source, status in rows:
        print(f"{name:{width}s}  {source}  [{status}]")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise PpolmError(f"ppolm serve needs the serve extra ({exc.name} is missing): pip install 'ppolm[serve]'") from None
    from ppolm.serve import ServeLimits, run_server

    limits = ServeLimits(max_concurrent_requests=args.max_concurrent) if args.max_concurrent else ServeLimits()
    api_key = args.api_key or os.environ.get("PPOLM_API_KEY") or None
    run_server(args.model, host=args.host, port=args.port, api_key=api_key, limits=limits, precision=args.precision)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from ppolm.export import export_model_dir

    out = export_model_dir(args.model, args.output, quantize=args.quantize, overwrite=args.overwrite)
    print(f"exported {args.model} -> {out} (weights: {args.quantize})")
    return 0


def dispatch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.command in CONFIG_COMMANDS:
        return _run_config_command(args)
    if args.command == "models":
        return _run_models()
    if args.command == "data":
        if args.data_command == "check":
            return _run_data_check(args)
        print("usage: ppolm data check FILE [...]\nerror: 'ppolm data' needs a command (check)", file=sys.stderr)
        return 2
    if args.command == "eval":
        return _load("ppolm.eval.run:eval_command")(args)
    if args.command == "generate":
        return _load("ppolm.eval.run:generate_command")(args)
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "export":
        return _run_export(args)
    if args.command == "plan":
        return _load("ppolm.plan_report:plan_command")(args)
    parser.print_usage(sys.stderr)
    print("error: a command is required (ppolm --help lists them)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        rc = _main(argv)
    finally:
        multi_process = _close_process_group()
    if multi_process:
        # A rank of a multi-process run leaves with os._exit once its output is flushed: its work and files are
        # done, and interpreter shutdown with gloo's threads still around aborted a finished rank even after
        # destroy_process_group ("terminate called without an active exception", exit -6; twice in this
        # repository's test suite on 2026-12-03). Only on a return: an exception keeps its traceback.
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return dispatch(args, parser)
    except PpolmError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # output piped into `head` and the like: not an error of ours
        sys.stderr.close()
        return 0


def _close_process_group() -> bool:
    """Tear the process group down before the interpreter does: gloo's threads, left to interpreter exit,
    sometimes abort a finished rank ("terminate called without an active exception", exit -6). Returns whether
    the group had more than one process."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        multi_process = dist.get_world_size() > 1
        dist.destroy_process_group()
        return multi_process
    return False


if __name__ == "__main__":
    sys.exit(main())
