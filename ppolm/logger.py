"""Run logging: one JSON line per step in metrics.jsonl, TensorBoard when installed, a progress bar, samples.

Metric names are stable `group/name` strings listed in docs/metrics.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf: write null so every line stays valid JSON for any reader.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Appends metrics to output_dir/metrics.jsonl (main process only); optional TensorBoard and tqdm."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, total: int, initial: int = 0,
                 tensorboard: bool = True, progress: bool = True, desc: str = "ppo"):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        for path in (self.path, self.dir / "samples.jsonl"):
            if initial == 0 and path.exists():
                path.unlink()
            elif initial > 0 and path.exists():
                self._truncate_after(path, initial)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: on resume, events of steps after the checkpoint are dropped (no duplicate points)
                self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=initial + 1 if initial > 0 else None)
            except ImportError:
                self.tb = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint so the file reads as one uninterrupted run."""
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        # atomic: a crash during the rewrite must not lose the steps before the checkpoint
        from ppolm.state_io import atomic_write_bytes

        atomic_write_bytes(path, "".join(k + "\n" for k in kept).encode("utf-8"))

    def log(self, step: int, metrics: dict[str, Any], headline: tuple[str, ...] = (), advance: bool = True) -> None:
        """Append a metrics.jsonl row (and TensorBoard scalars); advance=False for a row that is not a training
        step (the step-0 evaluation), so the progress bar counts steps only."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None and advance:
            self.bar.update(1)
            self.bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.3g}" for k in headline if k in metrics})

    def samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        with (self.dir / "samples.jsonl").open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
