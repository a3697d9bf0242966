"""Multi-process entry points: `accelerate launch` with the shipped configs (2 CPU processes over gloo)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, kill_group, launches, run_launcher
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["log.progress=false", "log.tensorboard=false"]
pytestmark = launches
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def accelerate_launch(config_file: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<config_file> -m ppolm.cli <args>` on a free port
    (config_file may also be an absolute path)."""
    path = config_file if os.path.isabs(config_file) else f"configs/accelerate/{config_file}"  # (or a test's own)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path,
           "--main_process_port", str(free_port()), "-m", "ppolm.cli", *args]
    return run_launcher(cmd, cwd=ROOT, env=ENV, timeout=timeout)


def ppolm_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ppolm.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_weight_diff(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


COMMON = ["--config", "configs/tiny.yaml", *QUIET, "max_steps=4", "ppo.epochs=2", "checkpoint.every=2",
          "checkpoint.keep=null"]
TWO_PROCESSES = ["rollout.batch_size=8", "ppo.minibatch_size=8", "ppo.grad_accum_steps=2"]  # global batch 16


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The 1-process run (16 rows a step) that 2 processes x 8 rows must reproduce."""
    run_dir = tmp_path_factory.mktemp("launch") / "one"
    one = ppolm_cli("ppo", *COMMON, f"output_dir={run_dir}", "rollout.batch_size=16", "ppo.minibatch_size=16")
    assert one.returncode == 0, one.stderr[-3000:]
    return run_dir


def assert_same_run(two: Path, one: Path) -> None:
    """Summation order differs across processes: weights agree to 1e-3 after 4 steps, metrics to rounding."""
    assert max_weight_diff(two / "final", one / "final") < 1e-3
    ma, mb = metrics(two), metrics(one)
    assert len(ma) == len(mb) == 4
    for x, y in zip(ma, mb):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        for k in ("loss/policy", "objective/kl", "optim/grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-5), k


@pytest.mark.slow
def test_accelerate_launch_ddp_equals_one_process_and_refuses_other_process_count(tmp_path, one_process):
    """accelerate launch, DDP on 2 CPU processes = 1 process; resuming its checkpoint in 1 process is refused in
    one line naming the process counts."""
    two = accelerate_launch("cpu-ddp-2.yaml", "ppo", *COMMON, f"output_dir={tmp_path}", *TWO_PROCESSES)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("final: ") == 1  # printed by the main process only
    assert (tmp_path / "checkpoint-4/rng-rank1.json").is_file()  # each rank's RNG streams
    assert_same_run(tmp_path, one_process)

    resumed = ppolm_cli("ppo", *COMMON, f"output_dir={tmp_path}", *TWO_PROCESSES, "max_steps=6", "resume=true")
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    err = resumed.stderr.strip()
    assert err.count("\n") == 0 and "process count changed (2 -> 1)" in err, err


@pytest.mark.slow
def test_fsdp2_ppo_equals_one_process_resumes_exactly_and_exports_hf(tmp_path, one_process):
    """FSDP2 on 2 CPU processes: sharded policy, reference and value head give the 1-process run; a run killed
    after checkpoint-2 and resumed ends bitwise equal to the uninterrupted one; final/ is a plain HF directory."""
    full, part = tmp_path / "full", tmp_path / "part"
    run = accelerate_launch("fsdp2-cpu.yaml", "ppo", *COMMON, f"output_dir={full}", *TWO_PROCESSES)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(full, one_process)

    part.mkdir()  # what a kill -9 after checkpoint-2 leaves (log lines past it included)
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    (part / "LATEST").write_text("checkpoint-2\n")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")
    resumed = accelerate_launch("fsdp2-cpu.yaml", "ppo", *COMMON, f"output_dir={part}", *TWO_PROCESSES,
                                "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-2" in resumed.stdout
    for name in ("final/model.safetensors", "checkpoint-4/critic.safetensors", "checkpoint-4/optimizer.safetensors"):
        a, b = load_file(full / name), load_file(part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(full / "final")
    saved = load_file(full / "final/model.safetensors")
    assert torch.equal(model.get_input_embeddings().weight, saved["model.embed_tokens.weight"])


@pytest.mark.slow
def test_fsdp2_sharded_checkpoints_resume_exactly_and_only_under_fsdp2(tmp_path, one_process):
    """checkpoint.sharded: each process writes its own shards (torch.distributed.checkpoint) inside the manifest;
    a run resumed from checkpoint-2 ends bitwise equal to the uninterrupted one; a DDP launch refuses the shards
    in one line."""
    full, part = tmp_path / "full", tmp_path / "part"
    sharded = "checkpoint.sharded=true"
    run = accelerate_launch("fsdp2-cpu.yaml", "ppo", *COMMON, f"output_dir={full}", *TWO_PROCESSES, sharded)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_run(full, one_process)
    ckpt = full / "checkpoint-2"
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "policy").exists() and not (ckpt / "optimizer.safetensors").exists()
    listed = {e["path"] for e in json.loads((ckpt / "manifest.json").read_text())["files"]}
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= listed
    assert not list(full.glob(".tmp-*"))

    part.mkdir()  # what a kill -9 after checkpoint-2 leaves
    shutil.copytree(ckpt, part / "checkpoint-2")
    (part / "LATEST").write_text("checkpoint-2\n")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")
    ddp = accelerate_launch("cpu-ddp-2.yaml", "ppo", *COMMON, f"output_dir={part}", *TWO_PROCESSES, "resume=true")
    assert ddp.returncode != 0, ddp.stderr[-3000:]  # the launcher exits 1 when its workers exit 2
    refusals = [line for line in ddp.stderr.splitlines() if "holds FSDP2 shards" in line]
    ours = [line for line in ddp.stderr.splitlines() if str(ROOT / "ppolm") in line]  # a traceback of ours
    assert refusals and refusals[0].startswith("error: ") and not ours, ddp.stderr[-3000:]  # (the launcher's own
    # traceback follows, as for any failed worker)
    resumed = accelerate_launch("fsdp2-cpu.yaml", "ppo", *COMMON, f"output_dir={part}", *TWO_PROCESSES, sharded,
                                "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-2" in resumed.stdout
    a, b = load_file(full / "final/model.safetensors"), load_file(part / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_machines_on_loopback_equal_one_process(tmp_path, one_process):
    """The multi-node recipe on one host: two `accelerate launch --machine_rank R` commands (1 process each),
    machine 0 on the loopback address, train as one 2-process run."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/two-machines.yaml",
           "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--machine_rank"]
    args = ["-m", "ppolm.cli", "ppo", *COMMON, f"output_dir={tmp_path / 'run'}", *TWO_PROCESSES]
    env = {**ENV, "LOGLEVEL": "INFO"}  # the elastic agents then log when their workers have finished
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)]
    machines = []
    for rank, log in zip((0, 1), logs):
        with log.open("w") as f:  # files, not pipes: nothing blocks on a full pipe while we wait for the other
            # own process groups: a launcher killed below takes its workers with it (as run_launcher's do)
            machines.append(subprocess.Popen([*cmd, str(rank), *args], cwd=ROOT, env=env, stdout=f,
                                             stderr=subprocess.STDOUT, text=True, start_new_session=True))
    try:
        codes = wait_for_machines(machines, logs)
    finally:
        for m in machines:
            if m.poll() is None:
                kill_group(m)
                m.wait()
    assert codes == [0, 0], logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
    assert_same_run(tmp_path / "run", one_process)


def wait_for_machines(machines: list[subprocess.Popen], logs: list[Path], timeout: float = 300,
                      grace: float = 60) -> list[int]:
    """Exit codes of the launchers. On loopback, torch elastic's exit barrier sometimes keeps one agent waiting
    its full 300 s after every worker has finished (seen in CI-like runs): once one launcher has exited, an
    agent still running `grace` seconds later that has logged its workers' success counts as exit 0 (killed);
    the weights and metrics it wrote are checked as for any run."""
    start = time.monotonic()
    while all(m.poll() is None for m in machines) and time.monotonic() - start < timeout:
        time.sleep(1)
    first_exit = time.monotonic()
    while any(m.poll() is None for m in machines) and time.monotonic() - first_exit < grace:
        time.sleep(1)
    codes = []
    for m, log in zip(machines, logs):
        if m.poll() is None and "worker group successfully finished" in log.read_text():
            kill_group(m)
            m.wait()
            codes.append(0)
        else:
            codes.append(m.poll())
    return codes


@pytest.mark.slow
def test_fsdp2_rollout_steps_until_every_process_is_done(tmp_path):
    """Sharded weights make every decode step a collective: a process whose rows all ended must keep stepping
    until the last process is done (rank 0's rows end at their first token, rank 1's run 12 tokens). Without the
    all_finished reduction rank 0 leaves the loop and rank 1's next forward fails."""
    def run(mode: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "tests/scripts/fsdp_generate_sync.py", mode]
        return run_launcher(cmd, cwd=ROOT, env=ENV, timeout=120)

    synced = run("synced")
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert "rank 0 width 12 ended [True, True] tokens 2" in synced.stdout, synced.stdout
    assert "rank 1 width 12 ended [False, False] tokens 24" in synced.stdout, synced.stdout
    assert run("unsynced").returncode != 0


def test_a_launcher_stuck_in_the_exit_barrier_counts_only_after_its_workers_succeeded(tmp_path):
    """wait_for_machines: once one launcher exits, one still running after the grace period is killed; it counts
    as exit 0 only if its log says its workers finished successfully."""
    logs = [tmp_path / f"m{i}.log" for i in range(3)]
    logs[1].write_text("[default] worker group successfully finished. Waiting 300 seconds for other agents\n")
    logs[2].write_text("still training\n")
    quick = subprocess.Popen([sys.executable, "-c", "pass"])
    stuck = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) for _ in range(2)]
    codes = wait_for_machines([quick, *stuck], logs, timeout=60, grace=1)
    assert codes == [0, 0, None]
    assert all(p.poll() is not None for p in (quick, stuck[0]))
    stuck[1].kill()


def test_a_launcher_that_times_out_takes_its_workers_with_it(tmp_path):
    """run_launcher: on a timeout the launcher's worker (a grandchild, as torchrun's are) is killed too, and
    TimeoutExpired is raised as subprocess.run would."""
    pid_file = tmp_path / "worker.pid"
    worker = "import os, time; open(os.environ['PID_FILE'], 'w').write(str(os.getpid())); time.sleep(600)"
    launcher = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {worker!r}])"
    with pytest.raises(subprocess.TimeoutExpired):
        run_launcher([sys.executable, "-c", launcher], env={**ENV, "PID_FILE": str(pid_file)}, timeout=5)
    pid = int(pid_file.read_text())

    def alive() -> bool:  # a killed orphan may stay a zombie until init reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(), f"worker {pid} outlived its launcher"


def test_accelerate_fp16_and_a_deepspeed_optimizer_are_refused_before_models_load_and_bf16_trains(tmp_path):
    """accelerate's fp16 loss scaling would feed scaled gradients to the finiteness check and the clipping, and
    an optimizer in the DeepSpeed config file would replace the run's own AdamW and LR schedule: both refused in
    one line (exit 2) before anything loads. bf16 is autocast only: it trains."""
    args = ["ppo", "--config", "configs/tiny.yaml", *QUIET, "max_steps=2", "checkpoint.every=0"]
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}))
    env = {**ENV, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)}
    ds = subprocess.run([sys.executable, "-m", "ppolm.cli", *args, f"output_dir={tmp_path / 'ds'}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=300)
    assert ds.returncode == 2 and ds.stderr.strip().count("\n") == 0, ds.stderr[-3000:]
    # (without the deepspeed extra the refusal names the missing install instead)
    assert (str(ds_json) in ds.stderr and "sets 'optimizer'" in ds.stderr) or "does not import" in ds.stderr
    assert not (tmp_path / "ds/config.yaml").exists()
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


@pytest.mark.slow
@pytest.mark.parametrize("kind, config, one_rows, extra", [
    ("sft", "configs/sft-tiny.yaml", "batch_size=8", ["eval_every=2"]),
    ("rm", "configs/rm-tiny.yaml", "batch_size=16", ["eval_every=2"]),
    ("sft", "configs/sft-tiny.yaml", "batch_size=8", ["checkpoint.sharded=true"]),
])
def test_fsdp2_sft_and_rm_equal_one_process_and_resume_exactly(tmp_path, kind, config, one_rows, extra):
    """SFT and reward-model training sharded over 2 CPU processes = 1 process (global batch equal); resumed
    from checkpoint-2 they end bitwise equal to the uninterrupted run (also from per-process shards,
    checkpoint.sharded); final/ loads as an HF model."""
    check_launch_equals_one_process(tmp_path, "fsdp2-cpu.yaml", kind, config, one_rows, extra,
                                    sharded="checkpoint.sharded=true" in extra)


def check_launch_equals_one_process(tmp_path: Path, launch: str, kind: str, config: str, one_rows: str,
                                    extra: list[str], sharded: bool) -> None:
    """`kind` (sft, rm) launched with configs/accelerate/`launch` on 2 processes x half the rows = 1 process;
    resumed from a copy of its checkpoint-2 (`sharded`: per-process shards in it) it ends bitwise equal."""
    common = ["--config", config, *QUIET, "max_steps=4", "checkpoint.every=2", "checkpoint.keep=null", *extra]
    two_rows = f"batch_size={int(one_rows.split('=')[1]) // 2}"
    one = ppolm_cli(kind, *common, f"output_dir={tmp_path / 'one'}", one_rows)
    assert one.returncode == 0, one.stderr[-3000:]
    full = accelerate_launch(launch, kind, *common, f"output_dir={tmp_path / 'full'}", two_rows)
    assert full.returncode == 0, full.stderr[-3000:]
    assert max_weight_diff(tmp_path / "full/final", tmp_path / "one/final") < 1e-4
    loss = f"loss/{kind}"
    for x, y in zip(metrics(tmp_path / "full"), metrics(tmp_path / "one"), strict=True):
        assert x[loss] == pytest.approx(y[loss], rel=1e-4)
        assert x["optim/grad_norm"] == pytest.approx(y["optim/grad_norm"], rel=1e-4)
        if "eval/loss" in y:
            assert x["eval/loss"] == pytest.approx(y["eval/loss"], rel=1e-4)

    part = tmp_path / "part"
    part.mkdir()
    assert (tmp_path / "full/checkpoint-2/sharded").is_dir() == sharded
    shutil.copytree(tmp_path / "full/checkpoint-2", part / "checkpoint-2")
    (part / "LATEST").write_text("checkpoint-2\n")
    resumed = accelerate_launch(launch, kind, *common, f"output_dir={part}", two_rows, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-2" in resumed.stdout
    a, b = load_file(tmp_path / "full/final/model.safetensors"), load_file(part / "final/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if kind == "sft":
        from transformers import AutoModelForCausalLM

        assert torch.equal(AutoModelForCausalLM.from_pretrained(part / "final").get_input_embeddings().weight,
                           b["model.embed_tokens.weight"])
