"""Guard decisions are agreed across processes (ppolm/trainers/watch.py: the main process's numbers decide)."""

import json
import sys

import pytest
from conftest import free_port, launches, run_launcher
from test_launch import ENV, ROOT

pytestmark = launches


@pytest.mark.slow
def test_a_guard_trip_seen_by_the_main_process_stops_both_processes(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "configs/accelerate/cpu-ddp-2.yaml",
           "--main_process_port", str(free_port()), "tests/scripts/guard_two_ranks.py", str(tmp_path)]
    done = run_launcher(cmd, cwd=ROOT, env=ENV, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    trip = json.loads((tmp_path / "guard.json").read_text())
    assert trip["step"] == 1 and "one label takes 100%" in trip["reason"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["guard/stopped"] == 1.0
    assert (tmp_path / "final" / "config.json").is_file()
