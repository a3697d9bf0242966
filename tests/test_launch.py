"""Multi-process entry points: `accelerate launch` with the shipped configs (2 CPU processes over gloo)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "log.tensorboard=false"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config_file: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<config_file> -m ppolm.cli <args>` on a free port."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"configs/accelerate/{config_file}",
           "--main_process_port", str(free_port()), "-m", "ppolm.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def ppolm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ppolm.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_weight_diff(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_accelerate_launch_ddp_equals_one_process_and_refuses_other_process_count(tmp_path):
    """Global batch 16: 2 processes x 8 rows (accelerate launch, DDP) vs 1 x 16; then resuming the 2-process
    run's checkpoint in 1 process is refused in one line naming the process counts.

    Tolerance: summation order differs across processes, so weights agree to 1e-3 after 4 steps, not bitwise.
    """
    common = ["--config", "configs/tiny.yaml", *QUIET, "max_steps=4", "ppo.epochs=2", "checkpoint.every=2"]
    two = accelerate_launch("cpu-ddp-2.yaml", "ppo", *common, f"output_dir={tmp_path / 'two'}",
                            "rollout.batch_size=8", "ppo.minibatch_size=8", "ppo.grad_accum_steps=2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("final: ") == 1  # printed by the main process only
    assert (tmp_path / "two/checkpoint-4/rng-rank1.json").is_file()  # each rank's RNG streams
    one = ppolm_cli("ppo", *common, f"output_dir={tmp_path / 'one'}", "rollout.batch_size=16",
                    "ppo.minibatch_size=16")
    assert one.returncode == 0, one.stderr[-3000:]
    assert max_weight_diff(tmp_path / "two/final", tmp_path / "one/final") < 1e-3
    ma, mb = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(ma) == len(mb) == 4
    for x, y in zip(ma, mb):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["loss/policy"] == pytest.approx(y["loss/policy"], rel=1e-3, abs=1e-5)
        assert x["objective/kl"] == pytest.approx(y["objective/kl"], rel=1e-3, abs=1e-5)

    resumed = ppolm_cli("ppo", *common, f"output_dir={tmp_path / 'two'}", "rollout.batch_size=8",
                        "ppo.minibatch_size=8", "ppo.grad_accum_steps=2", "max_steps=6", "resume=true")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    err = resumed.stderr.strip()
    assert err.count("\n") == 0 and "process count changed (2 -> 1)" in err, err


def test_accelerate_fp16_is_refused_before_models_load_and_bf16_trains(tmp_path):
    """accelerate's fp16 loss scaling would feed scaled gradients to the finiteness check and the clipping:
    refused in one line (exit 2) before anything loads. bf16 is autocast only: it trains."""
    args = ["ppo", "--config", "configs/tiny.yaml", *QUIET, "max_steps=2", "checkpoint.every=0"]
    env = {**ENV, "ACCELERATE_MIXED_PRECISION": "fp16"}
    fp16 = subprocess.run([sys.executable, "-m", "ppolm.cli", *args, f"output_dir={tmp_path / 'fp16'}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert fp16.returncode == 2
    assert fp16.stderr.strip().count("\n") == 0 and "mixed_precision 'fp16'" in fp16.stderr
    assert not (tmp_path / "fp16/config.yaml").exists()
    env["ACCELERATE_MIXED_PRECISION"] = "bf16"
    bf16 = subprocess.run([sys.executable, "-m", "ppolm.cli", *args, f"output_dir={tmp_path / 'bf16'}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    last = metrics(tmp_path / "bf16")[-1]
    assert last["optim/grad_norm"] > 0 and last["objective/kl"] == last["objective/kl"]  # finite, not NaN
