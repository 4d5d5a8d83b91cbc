"""Small helpers shared by the GPU benchmarks: timing, memory, JSON output."""

from __future__ import annotations

import importlib
import json
import pathlib
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def load_config(name: str):
  """``configs/<name>.py``'s ``get_config()`` (e.g. ``nemo``, ``nemo_14b``, ``tiny``)."""
  return importlib.import_module(f"configs.{name}").get_config()


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], *, warmup: int, steps: int) -> dict[str, float]:
  """Median/min/max seconds of `fn()` (blocked until ready) after `warmup` untimed calls."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "all_s": times}


def peak_memory_gib(device=None) -> float | None:
  stats = (device or jax.devices()[0]).memory_stats()
  if not stats:
    return None
  return stats.get("peak_bytes_in_use", 0) / 2**30


def memory_in_use_gib(device=None) -> float | None:
  stats = (device or jax.devices()[0]).memory_stats()
  if not stats:
    return None
  return stats.get("bytes_in_use", 0) / 2**30


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  return {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": d.device_kind,
          "device_count": jax.device_count()}


def write_json(path: str | None, payload: dict) -> None:
  if path:
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(payload, indent=2, default=float))


def count_in_hlo(compiled_text: str, needle: str) -> int:
  return compiled_text.count(needle)
