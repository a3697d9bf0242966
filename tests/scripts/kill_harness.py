"""kill -9 / resume harness shared by tests/test_kill_resume.py and bench/kill_resume.py.

`ForkServer` drives tests/scripts/ppo_forkserver.py (one fresh, killable process per job without paying the
torch import each time). `run_with_kills` starts a tiny PPO run with resume=true, SIGKILLs it at planned
moments (a time after start, or while a checkpoint is being written), restarts it until it exits 0, and
records what every attempt saw. `check_attempts` and `compare_runs` turn those records into problems.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ppolm.checkpoint import CheckpointManager
from ppolm.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).resolve().parent / "ppo_forkserver.py"
RESUMED = re.compile(r"^resumed from checkpoint-(\d+) \(step (\d+)\)$", re.MULTILINE)
ANY_TEMP = re.compile(r"\.tmp-checkpoint-.*")
# Metrics that legitimately differ between two runs of the same computation.
TIMING_PREFIXES = ("time/", "throughput/")


@dataclass
class Job:
    """One child of the fork server."""

    pid: int
    stdout: Path
    stderr: Path
    started: float
    rc: int | None = None

    def out(self) -> str:
        return self.stdout.read_text(encoding="utf-8", errors="replace")

    def err(self) -> str:
        return self.stderr.read_text(encoding="utf-8", errors="replace")


class ForkServer:
    """Client of ppo_forkserver.py; jobs run one at a time."""

    def __init__(self, optimize: bool = True):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(SERVER.parent)]),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, *(["-O"] if optimize else []), str(SERVER)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=env)
        self._buf = b""
        self._n = 0
        hello = self._read(timeout=600)
        if hello is None or not hello.get("ready"):
            raise RuntimeError(f"fork server did not start: {hello}")
        self.optimize = int(hello["optimize"])

    def _read(self, timeout: float | None) -> dict | None:
        """The next JSON line, or None when none arrived within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)  # raw reads: a buffered reader could hide a line from select()
            if not chunk:
                raise RuntimeError(f"fork server exited with {self.proc.wait()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def start(self, mode: str, argv: list[str], log_dir: str | Path, setup: str | None = None) -> Job:
        """Fork a job ('tiny' PPO run or 'cli' main); its stdout/stderr go to files in log_dir."""
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self._n += 1
        out, err = log_dir / f"job{self._n}.out", log_dir / f"job{self._n}.err"
        job = {"mode": mode, "argv": argv, "stdout": str(out), "stderr": str(err), "setup": setup}
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        reply = self._read(timeout=60)
        if reply is None or "pid" not in reply:
            raise RuntimeError(f"fork server did not start the job: {reply}")
        return Job(reply["pid"], out, err, time.perf_counter())

    def wait(self, job: Job, timeout: float | None = None) -> int | None:
        """Exit code (negative signal number when killed), or None if still running after `timeout`."""
        if job.rc is None:
            reply = self._read(timeout)
            if reply is None:
                return None
            job.rc = int(reply["rc"])
        return job.rc

    def run(self, mode: str, argv: list[str], log_dir: str | Path, setup: str | None = None,
            timeout: float = 600) -> Job:
        """Start a job and wait for it (SIGKILL after `timeout` seconds)."""
        job = self.start(mode, argv, log_dir, setup)
        if self.wait(job, timeout) is None:
            os.kill(job.pid, signal.SIGKILL)
            self.wait(job)
        return job

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_SERVERS: dict[bool, ForkServer] = {}


def shared_server(optimize: bool = True) -> ForkServer:
    """One server per interpreter flag for the whole pytest session (the import is the expensive part)."""
    server = _SERVERS.get(optimize)
    if server is None or server.proc.poll() is not None:
        server = _SERVERS[optimize] = ForkServer(optimize=optimize)
        import atexit

        atexit.register(server.close)
    return server


# ---- kill / resume loop -----------------------------------------------------------------------------------
@dataclass
class Attempt:
    """One process of a killed-and-resumed run."""

    kill: str  # 'none', 'time' (kill `planned_s` after start) or 'checkpoint' (`planned_s` after a .tmp appears)
    planned_s: float | None
    rc: int
    seconds: float
    resumed_from: int | None  # from this attempt's "resumed from checkpoint-N (step N)" line
    stale_removed: bool  # it logged the removal of stale temporary checkpoint dirs
    valid_after: list[int] = field(default_factory=list)  # checkpoints that verify once it is gone
    latest_after: str | None = None  # LATEST's content once it is gone
    temps_after: list[str] = field(default_factory=list)  # .tmp-checkpoint-* left behind
    stdout: str = ""

    @property
    def killed(self) -> bool:
        return self.rc == -signal.SIGKILL


def _temps(run_dir: Path, pattern: re.Pattern) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(run_dir) if pattern.fullmatch(e.name))
    except FileNotFoundError:
        return []


def _valid_checkpoints(run_dir: Path) -> list[int]:
    manager = CheckpointManager(run_dir)
    valid = []
    for step, path in manager.list_complete():
        try:
            manager.verify(path)
            valid.append(step)
        except CheckpointError:  # damaged: not loadable
            continue
    return sorted(valid)


@dataclass
class Timing:
    """How long an uninterrupted run takes: start-up (process start to first step), seconds per step
    (checkpoint included) and the tail after the last step (final save, export, exit)."""

    startup_s: float
    step_s: float
    tail_s: float
    total_s: float

    def remaining(self, from_step: int, max_steps: int) -> float:
        """Expected duration of a process that resumes at `from_step`."""
        return self.startup_s + (max_steps - from_step) * self.step_s + self.tail_s


def timed_run(server: ForkServer, run_dir: Path, argv: list[str], max_steps: int) -> tuple[Job, Timing]:
    """An uninterrupted run, timed by watching metrics.jsonl grow (polled every 5 ms)."""
    job = server.start("tiny", [*argv, f"output_dir={run_dir}"], run_dir.parent / f"{run_dir.name}-logs")
    metrics = run_dir / "metrics.jsonl"
    seen: dict[int, float] = {}
    while server.wait(job, 0.005) is None:
        if metrics.is_file():
            n = metrics.read_bytes().count(b"\n")
            seen.setdefault(n, time.perf_counter() - job.started)
    total = time.perf_counter() - job.started
    if job.rc != 0:
        raise RuntimeError(f"reference run failed ({job.rc}):\n{job.err()[-3000:]}")
    first, last = seen.get(1, 0.0), seen.get(max_steps, total)
    step_s = (last - first) / max(1, max_steps - 1)
    return job, Timing(max(0.0, first - step_s), step_s, total - last, total)


def _attempt(server: ForkServer, run_dir: Path, argv: list[str], kill: tuple[str, float] | None,
             timing: Timing, max_steps: int, log_dir: Path) -> Attempt:
    kind, planned = kill if kill else ("none", None)
    if kind == "time":
        # `planned` is a fraction of this process's expected life: it resumes at the newest valid checkpoint
        planned *= timing.remaining(max(_valid_checkpoints(run_dir), default=0), max_steps)
    job = server.start("tiny", [*argv, f"output_dir={run_dir}", "resume=true"], log_dir)
    rc = None
    if kind == "time":
        rc = server.wait(job, planned)
    elif kind == "checkpoint":
        # poll every millisecond for a save of this process (its pid names the temp dir; one left by an
        # earlier kill does not count); kill `planned` seconds after it appears
        mine = re.compile(rf"\.tmp-checkpoint-\d+-{job.pid}")
        while rc is None and not _temps(run_dir, mine):
            rc = server.wait(job, 0.001)
        if rc is None and planned:
            rc = server.wait(job, planned)
    if rc is None and kind != "none":
        os.kill(job.pid, signal.SIGKILL)
    rc = server.wait(job)
    out = job.out()
    resumed = RESUMED.findall(out)
    latest = run_dir / "LATEST"
    return Attempt(
        kind, planned, rc, time.perf_counter() - job.started,
        resumed_from=int(resumed[-1][0]) if resumed else None,
        stale_removed="stale temporary checkpoint dir" in out,
        valid_after=_valid_checkpoints(run_dir),
        latest_after=latest.read_text().strip() if latest.is_file() else None,
        temps_after=_temps(run_dir, ANY_TEMP), stdout=out,
    )


def run_with_kills(server: ForkServer, run_dir: Path, argv: list[str], plan: Iterator[tuple[str, float]],
                   timing: Timing, max_steps: int, max_attempts: int = 60) -> list[Attempt]:
    """Attempts (with resume=true) until one exits 0; each takes the next kill from `plan`, none once it is
    exhausted. A kill is ('time', u): SIGKILL at u x the attempt's expected duration (u uniform in [0, 1)
    spreads kills uniformly over start-up, steps, checkpoint writes and export), or ('checkpoint', d): SIGKILL
    d seconds after a checkpoint save's temporary directory appears."""
    attempts: list[Attempt] = []
    log_dir = run_dir.parent / f"{run_dir.name}-logs"
    while len(attempts) < max_attempts:
        a = _attempt(server, run_dir, argv, next(plan, None), timing, max_steps, log_dir)
        attempts.append(a)
        if a.rc == 0:
            return attempts
        if not a.killed:
            raise RuntimeError(f"attempt exited with {a.rc}:\n{a.stdout[-3000:]}")
    raise RuntimeError(f"no attempt finished within {max_attempts}")


def check_attempts(attempts: list[Attempt]) -> list[str]:
    """Problems with what the attempts loaded: every resume names the checkpoint the manager should pick,
    which verified complete before the restart; stale temp dirs are removed; none remain at the end."""
    problems = []
    for i, a in enumerate(attempts):
        before = attempts[i - 1] if i else None
        valid = set(before.valid_after) if before else set()
        reached_resume = a.resumed_from is not None or a.rc == 0
        if a.resumed_from is not None:
            if a.resumed_from not in valid:
                problems.append(f"attempt {i}: resumed from checkpoint-{a.resumed_from}, which was not complete "
                                f"(complete: {sorted(valid)})")
            named = before.latest_after if before else None
            m = re.fullmatch(r"checkpoint-(\d+)", named or "")
            want = int(m.group(1)) if m and int(m.group(1)) in valid else max(valid, default=None)
            if a.resumed_from != want:
                problems.append(f"attempt {i}: resumed from checkpoint-{a.resumed_from}, expected {want}")
        elif reached_resume and valid:
            problems.append(f"attempt {i}: started from scratch although {sorted(valid)} were complete")
        if before and before.temps_after and reached_resume and not a.stale_removed:
            problems.append(f"attempt {i}: did not report removing {before.temps_after}")
    if attempts and attempts[-1].temps_after:
        problems.append(f"temporary checkpoint dirs left at the end: {attempts[-1].temps_after}")
    return problems


def metrics_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def compare_runs(run_dir: Path, reference: Path, max_steps: int) -> list[str]:
    """Problems that make `run_dir` differ from the uninterrupted `reference`: final policy weights and the
    last checkpoint's policy/critic weights bitwise, metrics.jsonl steps 1..max_steps once each with every
    non-timing metric equal."""
    problems = []
    last = f"checkpoint-{max_steps}"
    for rel in ["final/model.safetensors", f"{last}/critic.safetensors", f"{last}/policy/model.safetensors"]:
        a, b = load_file(run_dir / rel), load_file(reference / rel)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            problems.append(f"{rel} differs from the uninterrupted run")
    rows = metrics_rows(run_dir)
    steps = [r["step"] for r in rows]
    if steps != list(range(1, max_steps + 1)):
        problems.append(f"metrics.jsonl steps are {steps}")
    by_step = {r["step"]: r for r in metrics_rows(reference)}
    for r in rows:
        ref = by_step.get(r["step"], {})
        diff = [k for k in ref if not k.startswith(TIMING_PREFIXES) and r.get(k) != ref[k]]
        if diff:
            problems.append(f"step {r['step']}: metrics differ: {diff[:4]}")
    return problems
