"""Shared test settings.

Tests build tiny models whose ops are far too small to gain from a second thread; with two threads and
another busy process on a 2-core machine, a tiny step can go from 30 ms to seconds (OpenMP spin-waits).
One torch thread per test process keeps the suite fast and its timings stable; PPOLM_TEST_THREADS overrides.
"""

import os

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
