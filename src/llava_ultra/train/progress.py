"""Progress bar and metrics logs of a training run (main process only).

- `MetricsLog` appends one JSON object per logged step to `<run>/metrics.jsonl` (stage, step,
  epoch, loss, lm_loss, kd_loss, lr, grad_norm, samples/s, elapsed seconds) and mirrors the
  numbers to TensorBoard under `<run>/tb` when `torch.utils.tensorboard` can be imported.
  Events (skipped samples, checkpoints) are logged as lines with an `event` key.
- `ProgressBar` is tqdm with loss, lr and samples/s in the postfix; tqdm itself shows the ETA.
  It writes to stderr and can be switched off (`train.progress: false`) for log files.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Append-only JSONL metrics (+ optional TensorBoard) for one run."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: JSONL only
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def log(self, record: dict[str, Any]) -> None:
        """A step record; numbers also go to TensorBoard as `stage{N}/<key>`."""
        record = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
        }
        self._append({"time": round(time.time(), 3), **record})
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key not in ("stage", "step", "epoch"):
                    self.writer.add_scalar(f"stage{record['stage']}/{key}", value, record["step"])

    def event(self, event: str, **fields: Any) -> None:
        """A non-step record, e.g. a skipped sample or a written checkpoint."""
        self._append({"time": round(time.time(), 3), "event": event, **fields})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class ProgressBar:
    """tqdm over optimiser steps with loss / lr / samples-per-second; a no-op when disabled."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, loss: float, lr: float, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.1f}")
            self.bar.update(1)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
