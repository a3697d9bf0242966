"""Shared test settings.

Tests build tiny models whose ops are far too small to gain from a second thread; with two threads and
another busy process on a 2-core machine, a tiny step can go from 30 ms to seconds (OpenMP spin-waits).
One torch thread per test process keeps the suite fast and its timings stable; PPOLM_TEST_THREADS overrides.
"""

import os
import signal
import subprocess

import pytest
import torch

torch.set_num_threads(int(os.environ.get("PPOLM_TEST_THREADS", "1")))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's rendezvous): a fixed port collides with any other
    multi-process run on the machine, e.g. a second test session."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Every test that starts several processes (torchrun, accelerate launch) runs in this xdist group, so on one worker
# and one at a time (`make test` passes --dist loadgroup): two launches at once put 4+ busy processes on a 2-core
# machine, and on one such machine two concurrent launches hung in torch.distributed's rendezvous until their
# 300 s timeouts (each passed alone in 40 s, and together once more in 69 s).
launches = pytest.mark.xdist_group("launches")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and, when it leads its own process group (start_new_session=True), every process of
    that group (its workers); a process in its parent's group is killed alone."""
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:  # already exited and reaped
        pass


def run_launcher(cmd: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) for a launcher of several processes: on a timeout
    the launcher's whole process group is killed before TimeoutExpired is raised. (subprocess.run kills only the
    launcher; its workers, stuck in a rendezvous, went on spending the cores the rest of the suite needs.)"""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
