"""Metric sinks: a JSON-lines file (always), wandb (optional), and a progress line on stdout.

Only process 0 writes. wandb runs offline by default (``config.wandb.mode``), so a run needs no
account; ``wandb sync <job>/wandb/offline-run-*`` uploads it later. ``mode="disabled"`` turns it off.

A resumed run first drops the rows a killed run wrote after its last checkpoint (they are logged
again), so ``metrics.jsonl`` holds one row per step and kind. The ETA counts only steps after the
first one of the run, whose time is mostly compilation.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np


_BAR_WIDTH = 20


def _scalar(v: Any) -> Any:
  if isinstance(v, (np.ndarray, np.generic)) or hasattr(v, "__array__"):
    a = np.asarray(v)
    return a.item() if a.size == 1 else a.tolist()
  return v


class MetricLogger:
  """Writes metrics to ``<job>/metrics.jsonl``, wandb and a progress line with an ETA."""

  def __init__(self, job_dir: pathlib.Path, config, *, total_steps: int, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._start_step = start_step
    self._eta_origin: tuple[int, float] | None = None  # (step, time) at the end of the run's first step
    self._jsonl = None
    self._wandb = None
    if not self.enabled:
      return
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / "metrics.jsonl"
    if path.exists():
      keep_rows_up_to(path, start_step if start_step > 0 else -1)
    self._jsonl = open(path, "a", buffering=1)
    if config.wandb.mode != "disabled":
      import wandb  # imported lazily: start-up cost and optional network use

      self._wandb = wandb.init(
          project=config.job.project,
          group=config.job.group,
          name=config.job.name,
          entity=config.wandb.entity or None,
          tags=list(config.wandb.tags),
          dir=str(job_dir),
          mode=config.wandb.mode,
          config=config.to_dict(),
          resume="allow",
          id=f"{config.job.group}-{config.job.name}".replace("/", "_"),
      )

  def log(self, step: int, metrics: Mapping[str, Any], *, prefix: str = "train") -> None:
    if not self.enabled:
      return
    row = {f"{prefix}/{k}": _scalar(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, "time": time.time(), **row}) + "\n")
    if self._wandb is not None:
      self._wandb.log(row, step=step)

  def step_done(self, step: int) -> None:
    """Called after every train step; the first call of the run starts the ETA clock."""
    if self._eta_origin is None:
      self._eta_origin = (step, time.monotonic())

  def eta_seconds(self, step: int) -> float | None:
    """Time left at the pace of the steps after the run's first one (None before there are any)."""
    if self._eta_origin is None or step <= self._eta_origin[0]:
      return None
    first, t0 = self._eta_origin
    return (self.total_steps - step) * (time.monotonic() - t0) / (step - first)

  def progress(self, step: int, metrics: Mapping[str, Any]) -> None:
    """One human-readable line: step, percentage, ETA and the main metrics."""
    if not self.enabled:
      return
    eta = self.eta_seconds(step)
    filled = int(_BAR_WIDTH * step / max(self.total_steps, 1))
    bar = "#" * filled + "." * (_BAR_WIDTH - filled)
    parts = [f"[{bar}] step {step}/{self.total_steps} ({100.0 * step / self.total_steps:5.1f}%)",
             f"eta {_fmt_duration(eta) if eta is not None else '--:--:--'}"]
    for k, v in metrics.items():
      v = _scalar(v)
      parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    print(" | ".join(parts), file=sys.stdout, flush=True)

  def log_video(self, step: int, name: str, path: pathlib.Path) -> None:
    if self.enabled and self._wandb is not None:
      import wandb

      self._wandb.log({name: wandb.Video(str(path), format="mp4")}, step=step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._wandb is not None:
      self._wandb.finish()


def keep_rows_up_to(path: pathlib.Path, last_step: int) -> None:
  """Rewrites the JSON-lines file ``path`` (atomically) without rows after ``last_step`` or broken rows."""
  kept = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except ValueError:  # a row cut short by a kill
      continue
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
      kept.append(line)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text("".join(f"{line}\n" for line in kept))
  os.replace(tmp, path)


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}"
