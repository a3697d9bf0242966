"""`ppolm plan` and `gradient_checkpointing: auto`: the planner's numbers for a PPO config, as a table or JSON, and
the fastest checkpointing mode that fits the memory budget, chosen before any model loads."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

from ppolm.plan import GiB, LAYOUT_KINDS, MODES, Layout, choose, peak_of
from ppolm.plan_inputs import (
    available_memory, fused_first_forward, layout_from_file, layout_of_launch, longest_prompt, model_shape,
    parse_memory, workload,
)

COMPONENT_ORDER = ("libraries", "allocator_slack", "policy_weights", "reference", "critic", "reward_model",
                   "optimizer_moments", "layout_buffers", "gradients", "activations", "logits", "gathered_weights",
                   "rollout_kv_cache", "train_phase")


def mode_name(mode: bool | str) -> str:
    """The config spelling of a checkpointing mode: false, selective, true."""
    return {False: "false", True: "true"}.get(mode, str(mode))  # type: ignore[arg-type]


def build_plan(cfg, *, launch: str | None = None, memory: int | None = None, device: str = "cpu",
               prompt_tokens: int | None = None) -> dict:
    """The plan of PPO config `cfg` as a JSON-ready dict: per layout (1 process, DDP, FSDP2, ZeRO-2, ZeRO-3 on the
    launch's process count, 2 without --launch) the components and `peak_bytes` at each checkpointing mode; the
    budget; the fastest settings that fit it on the launched layout (`recommendation`, null when none does)."""
    import torch

    from ppolm.runtime import autocast_dtype

    shape = model_shape(cfg.model, trust_remote_code=cfg.trust_remote_code)
    rm = model_shape(cfg.reward.model, kind="seqcls") if cfg.reward.model else None
    amp = autocast_dtype(cfg.precision, torch.device(device)) is not None
    prompt = prompt_tokens if prompt_tokens is not None else longest_prompt(cfg)
    w = workload(cfg, shape, prompt, device, amp, rm)
    launched = layout_from_file(launch)
    n = launched.processes if launched.processes > 1 else 2
    budget = memory if memory is not None else available_memory(device, launched.processes)
    p = cfg.ppo
    fused = fused_first_forward(cfg)
    pick = choose(shape, w, launched, budget, p.minibatch_size, fused) if budget else None
    rec = None
    if pick is not None:
        m, micro = pick
        rows = w.rows if fused and micro == p.minibatch_size else micro
        rec = {"layout": launched.name, "gradient_checkpointing": mode_name(m), "micro_batch_rows": micro,
               "grad_accum_steps": p.minibatch_size // micro,
               "peak_bytes": peak_of(shape, replace(w, micro_rows=rows), launched, m)[0]}
    # the components shown: of the config's mode, or with 'auto' of the mode it would take here
    mode = cfg.gradient_checkpointing
    shown = mode_name(mode) if mode != "auto" else (rec["gradient_checkpointing"] if rec else "true")
    layouts = {}
    for kind in LAYOUT_KINDS:
        layout = Layout(kind, 1 if kind == "single" else n, launched.zero3_live)
        by_mode = {mode_name(m): peak_of(shape, w, layout, m) for m in MODES}
        layouts[layout.name] = {
            "processes": layout.processes, "components": by_mode[shown][1], "peak_bytes": by_mode[shown][0],
            "peak_bytes_by_mode": {k: v[0] for k, v in by_mode.items()},
            "activations_by_mode": {k: v[1]["activations"] for k, v in by_mode.items()},
        }
    return {"model": cfg.model, "device": device, "workload": asdict(w) | {"reward_model": bool(rm)},
            "shape": asdict(shape), "gradient_checkpointing": mode_name(mode), "components_mode": shown,
            "launch": launched.name,
            "budget_bytes": budget, "budget_source": "--memory" if memory is not None else "available",
            "layouts": layouts, "recommendation": rec,
            "peak_bytes": layouts[launched.name]["peak_bytes"]}


def format_plan(plan: dict) -> str:
    """The plan as a table: one column per layout, one row per component (GiB), the peak at each mode."""
    w, names = plan["workload"], list(plan["layouts"])
    n = plan["layouts"][names[-1]]["processes"]
    shown = plan["components_mode"]
    lines = [f"ppolm plan: {plan['model']} on {plan['device']}, {w['rows']} rows x ({w['prompt_tokens']} prompt + "
             f"{w['response_tokens']} response) tokens a step per process, training forward over {w['micro_rows']} "
             f"rows, {'bf16 autocast' if w['amp'] else 'fp32'}; GiB per process (multi-process layouts: {n})",
             f"{'component':28s}" + "".join(f"{k:>11s}" for k in names)]
    for c in COMPONENT_ORDER:
        vals = [plan["layouts"][k]["components"][c] for k in names]
        if any(vals):
            label = f"{c} ({shown})" if c in ("activations", "train_phase") else c
            lines.append(f"{label:28s}" + "".join(f"{v / GiB:11.2f}" for v in vals))
    for m in ("false", "selective", "true"):
        lines.append(f"{'activations ' + m:28s}" + "".join(
            f"{plan['layouts'][k]['activations_by_mode'][m] / GiB:11.2f}" for k in names))
    for m in ("false", "selective", "true"):
        lines.append(f"{'peak, checkpointing ' + m:28s}" + "".join(
            f"{plan['layouts'][k]['peak_bytes_by_mode'][m] / GiB:11.2f}" for k in names))
    budget = plan["budget_bytes"]
    where = f"budget {budget / GiB:.2f} GiB ({plan['budget_source']})" if budget else "budget unknown (use --memory)"
    rec = plan["recommendation"]
    if rec is None and not budget:
        lines.append(where)
    elif rec is None:
        lines.append(f"{where}: nothing fits on {plan['launch']} (fewer rows, LoRA, or more processes with FSDP2)")
    else:
        lines.append(f"{where}: fastest that fits on {rec['layout']}: gradient_checkpointing={rec['gradient_checkpointing']}"
                     f", micro-batches of {rec['micro_batch_rows']} rows (ppo.grad_accum_steps={rec['grad_accum_steps']})"
                     f", peak {rec['peak_bytes'] / GiB:.2f} GiB")
    return "\n".join(lines)


def plan_command(args) -> int:
    """`ppolm plan CONFIG [key=value ...] [--launch FILE] [--memory SIZE] [--device cpu|cuda] [--json]`; CONFIG is a
    PPO config or a `ppolm run` config (its PPO stage is planned)."""
    from ppolm.config import PPORunConfig, load_config

    overrides = list(args.overrides)
    path = args.config
    if path and "=" in path:
        overrides.insert(0, path)
        path = None
    memory = parse_memory(args.memory) if args.memory is not None else None
    cfg = ppo_config_of(path, overrides) if path and _is_pipeline(path) else load_config(PPORunConfig, path, overrides)
    plan = build_plan(cfg, launch=args.launch, memory=memory, device=args.device, prompt_tokens=args.prompt_tokens)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


PIPELINE_KEYS = {"stages", "sft", "target", "adjust", "report", "keep_checkpoints"}  # (not keys of a PPO config)


def _is_pipeline(path: str) -> bool:
    """Whether YAML file `path` is a `ppolm run` config (it has a key only PipelineConfig has)."""
    import yaml

    try:
        data = yaml.safe_load(open(path, encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False  # (load_config then names the problem)
    return isinstance(data, dict) and bool(PIPELINE_KEYS & set(data))


def ppo_config_of(path: str, overrides: list[str]):
    """The PPO stage's config of a `ppolm run` config (overrides apply to the pipeline config: ppo.rollout...),
    with the pipeline's training data, which the stage reads as a split the pipeline hands it."""
    from pathlib import Path

    from ppolm.config import load_config
    from ppolm.pipeline import PipelineConfig, stage_config

    pipe = load_config(PipelineConfig, path, overrides)
    cfg = stage_config(pipe, "ppo", pipe.ppo, Path(pipe.output_dir) / "ppo", pipe.model)
    return cfg.model_copy(update={"task": cfg.task.model_copy(update={"data": pipe.task.data})})


def resolve_memory(cfg, runtime, prompt_tokens: int) -> tuple[bool | str, int | None]:
    """(gradient_checkpointing, ppo.grad_accum_steps or None for unchanged) of a PPO run whose checkpointing is
    'auto', before any model loads: False when the plan's peak with everything kept fits the memory available
    to this process (or the device's), else the cheapest mode that fits ('selective', then True). When no mode
    fits the whole minibatch and the config leaves ppo.grad_accum_steps at its default, the fastest (mode,
    micro-batch) that fits (`ppolm.plan.choose`); when nothing fits, True. A resumed run takes what its first run
    resolved (output_dir/config.yaml), so the checkpoint's fingerprint still matches. The main process decides
    for every process (they must agree). A mode other than 'auto' is returned as it is."""
    mode = cfg.gradient_checkpointing
    if mode != "auto":
        return mode, None
    # ppo.max_tokens sizes micro-batches by tokens and the config refuses it together with grad_accum_steps > 1,
    # so under max_tokens the planner leaves the row split alone.
    accum_free = "grad_accum_steps" not in cfg.ppo.model_fields_set and cfg.ppo.max_tokens is None
    saved = saved_settings(cfg.output_dir) if cfg.resume else None
    if saved is not None:
        return saved[0], saved[1] if accum_free else None
    device = runtime.device.type
    budget = available_memory(device, _local_processes(runtime.world_size))
    picked: tuple[bool | str, int | None] = ("selective", None)  # no budget to read: the default before 'auto'
    if budget:
        try:
            shape = model_shape(cfg.model, trust_remote_code=cfg.trust_remote_code)
            rm = model_shape(cfg.reward.model, kind="seqcls") if cfg.reward.model else None
        except Exception as exc:  # noqa: BLE001 (an architecture the meta device cannot build: not worth a failed run)
            print(f"warning: gradient_checkpointing auto: no memory plan for '{cfg.model}' "
                  f"({type(exc).__name__}: {str(exc)[:200]}); using 'selective'")
            return runtime.from_main(picked)
        import torch

        from ppolm.runtime import autocast_dtype

        amp = autocast_dtype(cfg.precision, torch.device(device)) is not None
        w = workload(cfg, shape, prompt_tokens, device, amp, rm)
        layout = layout_of_launch(runtime.world_size)
        fits = next((m for m in MODES if peak_of(shape, w, layout, m)[0] <= budget), None)
        picked = (fits, None) if fits is not None else (True, None)
        if fits is None and accum_free:
            pick = choose(shape, w, layout, budget, cfg.ppo.minibatch_size, fused_first_forward(cfg))
            if pick is not None:
                picked = (pick[0], cfg.ppo.minibatch_size // pick[1])
    return runtime.from_main(picked)


def _local_processes(world_size: int) -> int:
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def saved_settings(output_dir: str) -> tuple[bool | str, int] | None:
    """(gradient_checkpointing, ppo.grad_accum_steps) an earlier run in output_dir resolved (its config.yaml),
    None if there is none."""
    from pathlib import Path

    import yaml

    try:
        data = yaml.safe_load((Path(output_dir) / "config.yaml").read_text(encoding="utf-8")) or {}
        mode, accum = data.get("gradient_checkpointing"), int((data.get("ppo") or {}).get("grad_accum_steps", 1))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return None
    return (mode, accum) if mode in MODES else None


def settle_checkpointing(cfg, runtime, prompt_tokens: int | None = None):
    """A copy of run config `cfg` whose gradient_checkpointing is no longer 'auto' (what config.yaml then records),
    with one line on the main process saying what 'auto' became. PPO configs (`prompt_tokens` given) are planned
    (`resolve_memory`: the mode, and the micro-batch when no mode fits the whole minibatch); SFT, RM and DPO,
    which the planner does not model yet, take 'selective' (the default before 'auto')."""
    if cfg.gradient_checkpointing != "auto":
        return cfg
    accum = None
    if prompt_tokens is None:
        mode, why = "selective", "SFT/RM/DPO are not planned yet: the previous default"
    else:
        mode, accum = resolve_memory(cfg, runtime, prompt_tokens)
        why = "the memory plan (ppolm plan) against the memory available" + (
            " (kept from the run being resumed)" if cfg.resume and saved_settings(cfg.output_dir) else "")
    update = {"gradient_checkpointing": mode}
    also = ""
    if accum is not None and accum != cfg.ppo.grad_accum_steps:
        update["ppo"] = cfg.ppo.model_copy(update={"grad_accum_steps": accum})
        also = f", ppo.grad_accum_steps {cfg.ppo.grad_accum_steps} -> {accum}"
    if runtime.is_main:
        print(f"gradient_checkpointing: auto -> {mode_name(mode)}{also} ({why}; recorded in config.yaml)")
    return cfg.model_copy(update=update)
