"""Where a step's device time goes: trace calls with the JAX profiler and sum kernel time by kind.

``profile_calls(fn, folder)`` runs ``fn()`` once under ``jax.profiler.trace`` (with a Perfetto
trace, which is plain gzipped JSON) and returns ``summarize(trace)``: total device-busy time, the
time in attention forward/backward, matrix multiplies, collectives, copies and everything else
(XLA fusions: norms, RoPE, modulation, optimizer), and the kernels that take the most time.

    python -m benchmarks.profile_summary path/to/perfetto_trace.json.gz   # summarise a saved trace
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import jax

# First matching rule wins; names are matched in lower case against the kernel name.
CATEGORIES = (
    ("attention_backward", ("sdpa", "fmha", "flash", "attention"), ("bprop", "bwd", "backward", "dq", "dkdv")),
    ("attention_forward", ("sdpa", "fmha", "flash", "attention"), ()),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "dot"), ()),
    ("collective", ("nccl", "all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective"), ()),
    ("copy", ("memcpy", "memset", "copy", "transpose"), ()),
)


def categorize(name: str) -> str:
  low = name.lower()
  for category, needles, also in CATEGORIES:
    if any(n in low for n in needles) and (not also or any(a in low for a in also)):
      return category
  return "other_fusions"


def _device_events(events: list[dict]) -> tuple[list[dict], list[str]]:
  """Complete ('X') events of the device kernel streams (GPU) or of XLA ops (CPU fallback)."""
  process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device_pids = {pid for pid, name in process.items() if "/device:" in name}
  streams = {key for key, name in thread.items() if key[0] in device_pids and name.lower().startswith("stream")}
  if streams:
    chosen = [e for e in events if e.get("ph") == "X" and (e["pid"], e.get("tid")) in streams]
    return chosen, sorted({thread[k] for k in streams})
  chosen = [e for e in events if e.get("ph") == "X" and "hlo_op" in (e.get("args") or {})]
  return chosen, ["events with an hlo_op (no device streams in this trace)"]


def summarize(trace: dict | list, top: int = 25) -> dict[str, Any]:
  """Kernel time by category and the top kernels of a Chrome/Perfetto trace (times in ms)."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kernels, sources = _device_events(events)
  by_category: dict[str, float] = collections.defaultdict(float)
  by_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for e in kernels:
    ms = float(e.get("dur", 0.0)) / 1e3
    by_category[categorize(e["name"])] += ms
    by_name[e["name"]][0] += ms
    by_name[e["name"]][1] += 1
  busy = sum(by_category.values())
  span = 0.0
  if kernels:
    span = (max(e["ts"] + e.get("dur", 0.0) for e in kernels) - min(e["ts"] for e in kernels)) / 1e3
  ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
  return {
      "sources": sources,
      "kernels": len(kernels),
      "busy_ms": busy,
      "span_ms": span,
      "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
      "by_category_fraction": {k: v / busy for k, v in by_category.items()} if busy else {},
      "top_kernels": [{"name": n[:160], "category": categorize(n), "ms": ms, "calls": c}
                      for n, (ms, c) in ranked],
  }


def load_trace(path: str | pathlib.Path) -> dict:
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rt") as f:
    return json.load(f)


def profile_calls(fn: Callable[[], Any], folder: str | pathlib.Path) -> dict[str, Any]:
  """Runs `fn()` once under the profiler (trace written below `folder`) and summarises the trace."""
  folder = pathlib.Path(folder)
  with jax.profiler.trace(str(folder), create_perfetto_trace=True):
    jax.block_until_ready(fn())
  traces = sorted(folder.glob("plugins/profile/*/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"the profiler wrote no perfetto_trace.json.gz under {folder}")
  return {"trace": str(traces[-1]), **summarize(load_trace(traces[-1]))}


if __name__ == "__main__":
  print(json.dumps(summarize(load_trace(sys.argv[1])), indent=2))
