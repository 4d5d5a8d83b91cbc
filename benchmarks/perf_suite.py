"""One command for the step benchmarks of one GPU: runs a plan of variants within a time budget.

Each variant is its own process (``benchmarks.train_step`` timing the trainer's step, or
``benchmarks.memory_report`` compiling it and reading its memory), so its peak memory is its own and
one failure does not stop the rest. A variant whose expected duration no longer fits the budget is
skipped; a failed variant with a ``fallback`` runs that instead (e.g. cuDNN when FA3 fails). Every
variant writes ``OUT/<name>.json`` and ``OUT/<name>.log``; ``OUT/summary.json`` and the printed table
hold the key numbers.

    python -m benchmarks.perf_suite --out=DIR [--plan=default] [--budget_s=530]
    python -m benchmarks.perf_suite --list             # the variants and plans, nothing run

``--plan`` is a comma list of plan and variant names, run in that order: ``default`` (the targets:
720p fp32 master, 720p reference_bf16, 480p; then the EMA update as its own program, the 720p memory
breakdown and attention offloading), ``options`` (further options side by side), ``tiny`` (the CPU
test of this driver).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  module: str  # train_step | memory_report
  args: tuple[str, ...]
  expected_s: float  # typical wall time on one H200, process start included
  fallback: str | None = None
  what: str = ""


_EMA_HOST = ("--set", "ema.offload=True")
_TIMED_720P = ("--shape=720p", "--steps=2", "--warmup=1")
_FA3 = ("--backend=fa3",)  # opt-in: `auto` picks cuDNN

VARIANTS = {v.name: v for v in (
    # The targets (default plan).
    Variant("ts_720p_fp32", "train_step", _TIMED_720P + _EMA_HOST + _FA3, 95, "ts_720p_fp32_cudnn",
            "720p, fp32 master, save_attention, FA3, EMA in host memory: target <= 11.3 s, <= 75 GiB"),
    Variant("ts_720p_bf16", "train_step", _TIMED_720P + ("--precision=reference_bf16",) + _EMA_HOST + _FA3, 90,
            "ts_720p_bf16_cudnn", "720p, reference_bf16, save_attention, FA3, EMA in host memory: <= 11.5 s, <= 57 GiB"),
    Variant("ts_480p_dots", "train_step", ("--shape=480p", "--remat=save_dots", "--steps=6", "--warmup=2") + _FA3, 60,
            "ts_480p_dots_cudnn", "480p, fp32 master, save_dots, FA3: target <= 0.50 s"),
    Variant("mr_720p_fp32", "memory_report", ("--shape=720p", "--dump=/tmp/xla_dump_mr_720p_fp32", "--top=40"), 70,
            None, "720p fp32 master, save_attention, EMA on device: residuals, compiled memory, buffers at peak"),
    # Options side by side.
    Variant("ts_720p_fp32_ema_device", "train_step", _TIMED_720P, 95, None,
            "as ts_720p_fp32 with the EMA on the device (no host transfers)"),
    Variant("ts_720p_fp32_ema_separate", "train_step",
            _TIMED_720P + _EMA_HOST + ("--set", "ema.offload_update=separate"), 95, None,
            "as ts_720p_fp32 with the EMA update as a program of its own"),
    Variant("ts_720p_fp32_ema_every4", "train_step",
            ("--shape=720p", "--steps=4", "--warmup=1") + _EMA_HOST + ("--set", "ema.every_n_steps=4"), 110, None,
            "as ts_720p_fp32 with the EMA updated every 4th step (median over 4 steps)"),
    Variant("ts_720p_fp32_offload_attention", "train_step", _TIMED_720P + ("--remat=offload_attention",), 95,
            None, "720p fp32 master, attention results kept in host memory, EMA on device"),
    Variant("mr_720p_fp32_ema_host", "memory_report",
            ("--shape=720p", "--no_residuals") + _EMA_HOST, 55, None, "compiled memory, EMA in host memory (in the step)"),
    Variant("mr_720p_fp32_ema_separate", "memory_report",
            ("--shape=720p", "--no_residuals") + _EMA_HOST + ("--set", "ema.offload_update=separate"), 55, None,
            "compiled memory, EMA in host memory (its own program)"),
    Variant("mr_720p_fp32_offload_attention", "memory_report",
            ("--shape=720p", "--no_residuals", "--remat=offload_attention"), 55, None,
            "compiled memory, attention results in host memory"),
    Variant("mr_720p_bf16", "memory_report",
            ("--shape=720p", "--precision=reference_bf16", "--dump=/tmp/xla_dump_mr_720p_bf16", "--top=40"), 70, None,
            "720p reference_bf16, EMA on device: residuals, compiled memory, buffers at peak"),
    Variant("ts_480p_attention", "train_step", ("--shape=480p", "--remat=save_attention", "--steps=6", "--warmup=2") + _FA3,
            60, None, "480p, fp32 master, save_attention, FA3"),
    Variant("ts_480p_dots_bf16", "train_step",
            ("--shape=480p", "--remat=save_dots", "--precision=reference_bf16", "--steps=6", "--warmup=2") + _FA3,
            60, None, "480p, reference_bf16, save_dots, FA3"),
    # Fallbacks: the same with cuDNN attention (the remat and memory fixes still apply).
    Variant("ts_720p_fp32_cudnn", "train_step", _TIMED_720P + _EMA_HOST + ("--backend=cudnn",), 95),
    Variant("ts_720p_bf16_cudnn", "train_step",
            _TIMED_720P + ("--precision=reference_bf16", "--backend=cudnn") + _EMA_HOST, 90),
    Variant("ts_480p_dots_cudnn", "train_step", ("--shape=480p", "--remat=save_dots", "--steps=6", "--warmup=2",
                                                 "--backend=cudnn"), 60),
    # CPU smoke test of this driver.
    Variant("tiny_step", "train_step", ("--tiny", "--steps=1", "--warmup=0") + _EMA_HOST, 120),
    Variant("tiny_memory", "memory_report", ("--tiny", "--remat=save_attention", "--dump={out}/xla_dump"), 120),
)}

PLANS = {
    # The targets first, then what decides between the memory options (in-step vs separate EMA
    # update; where the rest of the memory goes; whether XLA offloads the attention results).
    "default": ("ts_720p_fp32", "ts_720p_bf16", "ts_480p_dots", "ts_720p_fp32_ema_separate", "mr_720p_fp32",
                "mr_720p_fp32_offload_attention"),
    "options": ("ts_720p_fp32_ema_device", "ts_720p_fp32_offload_attention", "ts_720p_fp32_ema_every4",
                "mr_720p_fp32_ema_host", "mr_720p_fp32_ema_separate", "mr_720p_bf16", "ts_480p_attention",
                "ts_480p_dots_bf16"),
    "tiny": ("tiny_step", "tiny_memory"),
}


def _key_numbers(module: str, payload: dict[str, Any]) -> dict[str, Any]:
  r = payload.get("result", {})
  mem = r.get("compiled_memory") or r.get("compiled") or {}
  out = {"compiled_peak_gib": mem.get("peak_gib"), "compiled_temporaries_gib": mem.get("temporaries_gib"),
         "state_gib": mem.get("state_gib"), "state_host_gib": mem.get("state_host_gib")}
  if module == "train_step":
    out.update({k: r.get(k) for k in ("median_s", "min_s", "peak_gib", "compile_s", "loss", "attention_kernel",
                                      "fa3_fwd_calls", "fa3_bwd_calls", "cudnn_fmha_calls", "model_tflops_per_s")})
  else:
    res = r.get("residuals") or {}
    out.update({"residuals_gib": res.get("total_gib"), "compile_s": r.get("compile_s"),
                "buffers_at_peak_gib": {k: b.get("by_kind_gib") for k, b in (r.get("buffers") or {}).items()}})
  return out


def run_variant(v: Variant, out: pathlib.Path, timeout_s: float) -> dict[str, Any]:
  json_path, log_path = out / f"{v.name}.json", out / f"{v.name}.log"
  args = [a.replace("{out}", str(out)) for a in v.args]
  cmd = [sys.executable, "-m", f"benchmarks.{v.module}", *args, f"--json={json_path}"]
  t0 = time.perf_counter()
  with open(log_path, "w") as log:
    try:
      proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
      status = "ok" if proc.returncode == 0 and json_path.exists() else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
      status = f"timed out after {timeout_s:.0f} s"
  row = {"name": v.name, "status": status, "wall_s": time.perf_counter() - t0, "command": " ".join(cmd[1:]),
         "what": v.what}
  if status == "ok":
    row.update(_key_numbers(v.module, json.loads(json_path.read_text())))
  else:
    row["log_tail"] = log_path.read_text()[-1500:]
  return row


def run_plan(names: list[str], out: pathlib.Path, budget_s: float) -> list[dict[str, Any]]:
  out.mkdir(parents=True, exist_ok=True)
  start, rows = time.perf_counter(), []
  queue = list(names)
  while queue:
    v = VARIANTS[queue.pop(0)]
    left = budget_s - (time.perf_counter() - start)
    if v.expected_s > left:
      rows.append({"name": v.name, "status": f"skipped: {left:.0f} s of the budget left, needs ~{v.expected_s:.0f} s"})
      continue
    print(f"[{time.perf_counter() - start:6.0f} s] {v.name}: {v.what or ' '.join(v.args)}", flush=True)
    row = run_variant(v, out, timeout_s=min(left, 2.5 * v.expected_s))
    rows.append(row)
    print(f"         {row['status']} in {row['wall_s']:.0f} s: "
          + json.dumps({k: row.get(k) for k in ("median_s", "peak_gib", "compiled_peak_gib", "loss") if k in row}),
          flush=True)
    if row["status"] != "ok" and v.fallback:
      queue.insert(0, v.fallback)
    (out / "summary.json").write_text(json.dumps({"budget_s": budget_s, "variants": rows}, indent=2, default=str))
  return rows


def expand_plan(plan: str) -> list[str]:
  """'default,ts_720p_fp32_ema_device' → the variant names, plans expanded, duplicates dropped."""
  names: list[str] = []
  for item in plan.split(","):
    for name in PLANS.get(item, (item,)):
      if name not in names:
        names.append(name)
  return names


def _print_table(rows: list[dict[str, Any]]) -> None:
  cols = ("median_s", "peak_gib", "compiled_peak_gib", "compiled_temporaries_gib", "state_gib", "compile_s", "loss")
  print("\n" + " | ".join(["variant", "status", *cols]))
  fmt = lambda x: f"{x:.3f}" if isinstance(x, float) else ("" if x is None else str(x))  # noqa: E731
  for r in rows:
    print(" | ".join([r["name"], r["status"][:40], *(fmt(r.get(c)) for c in cols)]))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "perf_suite_out"))
  ap.add_argument("--plan", default="default", help=f"comma list of plans {sorted(PLANS)} and variants")
  ap.add_argument("--budget_s", type=float, default=530.0)
  ap.add_argument("--list", action="store_true")
  args = ap.parse_args()
  if args.list:
    for name, v in VARIANTS.items():
      print(f"{name:34s} ~{v.expected_s:4.0f} s  python -m benchmarks.{v.module} {' '.join(v.args)}  {v.what}")
    for name, plan in PLANS.items():
      print(f"plan {name}: {', '.join(plan)} (~{sum(VARIANTS[n].expected_s for n in plan):.0f} s)")
    return
  names = expand_plan(args.plan)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise SystemExit(f"error: unknown variants {unknown}; --list shows them")
  rows = run_plan(names, pathlib.Path(args.out), args.budget_s)
  _print_table(rows)


if __name__ == "__main__":
  main()
