"""A fork server for tests that start many short PPO or CLI processes (kill/resume, CLI error paths).

Importing torch + transformers + ppolm takes 5-30 s on a loaded 2-core machine; a kill/resume test starts a
dozen processes. This server pays the import once and forks one child per job, so every job is a fresh OS
process (own pid, killable with SIGKILL, own file descriptors) that starts in milliseconds. The server never
runs a torch op before forking, so no thread pool exists to be broken by fork().

Protocol: one JSON object per line on stdin, answered by JSON lines on stdout.
  -> {"mode": "tiny" | "cli", "argv": [...], "stdout": PATH, "stderr": PATH, "setup": "module:fn" | null}
  <- {"pid": PID}                  as soon as the child exists
  <- {"pid": PID, "rc": CODE}      when it is gone: exit code, or -SIGNAL when killed
'tiny' runs tests/scripts/ppo_tiny_run.py's config (configs/tiny.yaml + argv overrides) with PPOTrainer;
'cli' runs ppolm.cli.main(argv) and exits with its return code, as `python -m ppolm.cli` would.
`setup` (optional) is called in the child first, e.g. to install a gradient hook.
The first line written is {"ready": true, "optimize": sys.flags.optimize}.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path

# imported before any fork: paying for these once is the reason this server exists
import ppolm.cli
from ppolm.config import PPORunConfig, load_config
from ppolm.trainers.ppo import PPOTrainer

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["log.progress=false", "log.tensorboard=false"]

# Modules transformers and ppolm import lazily on first use: importing them here keeps each child's start-up
# short and steady (kill times are drawn from a measured run's duration). Imports only, no torch op.
for _name in ("ppolm.tasks.toy", "transformers.models.llama.modeling_llama", "transformers.tokenization_python",
              "transformers.generation.utils", "tqdm.contrib.logging"):
    try:
        importlib.import_module(_name)
    except ImportError:  # another transformers version: the child imports what it needs itself
        pass


def _run_job(job: dict) -> int:
    """Body of a child: returns the exit code."""
    if job.get("setup"):
        module, _, attr = job["setup"].partition(":")
        getattr(importlib.import_module(module), attr)()
    if job["mode"] == "tiny":
        cfg = load_config(PPORunConfig, ROOT / "configs/tiny.yaml", [*QUIET, *job["argv"]])
        PPOTrainer(cfg).train()
        return 0
    return int(ppolm.cli.main(job["argv"]) or 0)


def _child(job: dict) -> None:
    """Redirect fds 1/2 to the job's files and run it; never returns (os._exit skips the server's loop)."""
    rc = 1
    try:
        for fd, key in ((1, "stdout"), (2, "stderr")):
            target = os.open(job[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        # line buffering: a SIGKILL must not swallow lines already printed (e.g. "resumed from ...")
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        rc = _run_job(job)
    except SystemExit as exc:  # argparse errors and explicit exits
        rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _send(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    _send({"ready": True, "optimize": sys.flags.optimize})
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        sys.stdout.flush()  # nothing buffered may be duplicated into the child
        pid = os.fork()
        if pid == 0:
            _child(job)
        _send({"pid": pid})
        _, status = os.waitpid(pid, 0)
        _send({"pid": pid, "rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    main()
