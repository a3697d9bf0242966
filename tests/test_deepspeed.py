"""DeepSpeed ZeRO-2 and ZeRO-3 through `accelerate launch` (configs/accelerate/deepspeed-zero{2,3}-cpu.yaml): 2 CPU
processes over gloo, PPO, SFT and RM, each against the 1-process run, resumed from the engine's sharded
checkpoints; a non-finite gradient on one process skips the step like the guarded step does under DDP."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import free_port, launches, run_launcher
from safetensors.torch import load_file

from test_launch import (  # the launch helpers and the 1-process reference run of the DDP/FSDP2 tests
    COMMON, ENV, ROOT, TWO_PROCESSES, accelerate_launch, assert_same_run, check_launch_equals_one_process,
    max_weight_diff, metrics, one_process,
)

ZERO2 = "deepspeed-zero2-cpu.yaml"
pytestmark = [
    launches,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed "
                       "(the optional extra: DS_BUILD_OPS=0 pip install -e '.[deepspeed]')"),
]
__all__ = ["one_process"]  # a fixture, imported so that this module reuses it


def zero3_launch_config(tmp_path: Path) -> str:
    """The shipped ZeRO-3 launch with a DeepSpeed JSON config (deepspeed_config_file) that partitions every
    parameter: by default ZeRO-3 keeps parameters under 1e5 elements whole, which is all of the tiny test model."""
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    launch = yaml.safe_load((ROOT / "configs/accelerate/deepspeed-zero3-cpu.yaml").read_text())
    launch["deepspeed_config"] = {"deepspeed_config_file": str(ds_json), "zero3_init_flag": False}
    out = tmp_path / "zero3-launch.yaml"
    out.write_text(yaml.safe_dump(launch))
    return str(out)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_ppo_equals_one_process_and_resumes_exactly_from_the_engine_shards(tmp_path, one_process, stage):
    """PPO under ZeRO-2 / ZeRO-3 = 1 process (same metrics, weights within 1e-3 after 4 steps); every checkpoint
    holds the engine's files (each process's optimizer partition) inside the manifest; resumed from checkpoint-2
    it ends bitwise equal to the uninterrupted run; a DDP launch refuses those shards in one line; final/ is a
    plain HF directory (ZeRO-3: gathered from the partitions)."""
    launch = ZERO2 if stage == 2 else zero3_launch_config(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    run = accelerate_launch(launch, "ppo", *COMMON, f"output_dir={full}", *TWO_PROCESSES)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(full, one_process)
    ckpt = full / "checkpoint-2"
    partitions = {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert partitions <= {p.name for p in (ckpt / "sharded/zero").iterdir()}
    listed = {e["path"] for e in json.loads((ckpt / "manifest.json").read_text())["files"]}
    assert {f"sharded/zero/{name}" for name in partitions} <= listed
    assert not (ckpt / "policy").exists() and not (ckpt / "optimizer.safetensors").exists()
    assert not list(full.glob(".tmp-*"))

    part.mkdir()  # what a kill -9 after checkpoint-2 leaves
    shutil.copytree(ckpt, part / "checkpoint-2")
    (part / "LATEST").write_text("checkpoint-2\n")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")
    if stage == 2:  # (the refusal does not depend on the stage)
        ddp = accelerate_launch("cpu-ddp-2.yaml", "ppo", *COMMON, f"output_dir={part}", *TWO_PROCESSES, "resume=true")
        refusals = [line for line in ddp.stderr.splitlines() if "holds DeepSpeed ZeRO shards" in line]
        ours = [line for line in ddp.stderr.splitlines() if str(ROOT / "ppolm") in line]  # a traceback of ours
        assert ddp.returncode != 0 and refusals and refusals[0].startswith("error: ") and not ours, ddp.stderr[-3000:]
    resumed = accelerate_launch(launch, "ppo", *COMMON, f"output_dir={part}", *TWO_PROCESSES, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-2" in resumed.stdout
    a, b = load_file(full / "final/model.safetensors"), load_file(part / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from transformers import AutoModelForCausalLM

    assert torch.equal(AutoModelForCausalLM.from_pretrained(part / "final").get_input_embeddings().weight,
                       b["model.embed_tokens.weight"])


@pytest.mark.parametrize("kind, config, one_rows, stage", [
    ("sft", "configs/sft-tiny.yaml", "batch_size=8", 3),
    ("rm", "configs/rm-tiny.yaml", "batch_size=16", 2),
    ("rm", "configs/rm-tiny.yaml", "batch_size=16", 3),
])
def test_zero_sft_and_rm_equal_one_process_and_resume_exactly(tmp_path, kind, config, one_rows, stage):
    """SFT and reward-model training under ZeRO = 1 process (with held-out evaluations in lockstep under ZeRO-3);
    resumed from checkpoint-2 (always the engine's shards) they end bitwise equal to the uninterrupted run."""
    launch = ZERO2 if stage == 2 else zero3_launch_config(tmp_path)
    check_launch_equals_one_process(tmp_path, launch, kind, config, one_rows, ["eval_every=2"], sharded=True)


def test_zero2_skips_a_step_whose_gradient_is_nan_on_one_process_like_ddp(tmp_path):
    """A NaN in process 0's gradient (backward pass 2: the second optimizer step of PPO step 1) lands in one
    process's ZeRO partition only; the engine still skips the step on both processes, and the run counts it and
    goes on exactly like the same run under DDP (whose guarded step is ppolm's own)."""
    script = str(ROOT / "tests/scripts/nan_rank0_cli.py")
    runs = {}
    for launch in (ZERO2, "cpu-ddp-2.yaml"):
        out = tmp_path / launch.split("-")[0]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{launch}",
               "--main_process_port", str(free_port()), script, "ppo", *COMMON, f"output_dir={out}",
               *TWO_PROCESSES, "max_steps=2"]
        run = run_launcher(cmd, cwd=ROOT, env={**ENV, "NAN_CALLS": "2"}, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[launch] = out
    zero_rows, ddp_rows = metrics(runs[ZERO2]), metrics(runs["cpu-ddp-2.yaml"])
    assert [r["optim/nonfinite_skipped_total"] for r in zero_rows] == [1.0, 1.0]
    assert [r["optim/nonfinite_skipped_total"] for r in ddp_rows] == [1.0, 1.0]
    for x, y in zip(zero_rows, ddp_rows, strict=True):
        assert x["optim/grad_norm"] == pytest.approx(y["optim/grad_norm"], rel=1e-3)  # the applied steps' norm
        assert x["loss/policy"] == pytest.approx(y["loss/policy"], rel=1e-3, abs=1e-5)
    assert max_weight_diff(runs[ZERO2] / "final", runs["cpu-ddp-2.yaml"] / "final") < 1e-4
    assert all(torch.isfinite(v).all() for v in load_file(runs[ZERO2] / "final/model.safetensors").values())
