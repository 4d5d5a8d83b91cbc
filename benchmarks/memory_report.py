"""Where the train step's device memory goes, for one shape / remat / precision / backend / options.

Three views of the trainer's own step (built by ``benchmarks/common.py`` exactly as the trainer does;
compiled from abstract shapes, so nothing but the compile needs memory):

1. ``residuals``: what autodiff keeps from the forward for the backward, read from the jaxpr of the
   DiT loss (``jax.ad_checkpoint.saved_residuals``): arrays stacked over the scanned blocks (shape
   ``[num_blocks, ...]``: block inputs, attention outputs, softmax statistics) and the rest, with bytes.
   Exact for any shape at trace cost only (no compile); needs the attention kernel to trace here
   (cuDNN does not on CPU).
2. ``compiled``: XLA's memory analysis of each compiled program, per device: arguments (train state
   + batch), outputs, aliased (donated state written in place), temporaries, and peak
   (``training/memory.py``).
3. ``buffers`` (with ``--dump=DIR``): XLA's buffer assignment of the step: every buffer live at the
   peak of its schedule, largest first, with HLO shape and JAX op name, summed by kind (train state,
   batch, loop-carried/stacked, other temporaries). This is where a surprise (a second copy of
   something, an fp32 temporary) shows up by name.

    python -m benchmarks.memory_report --shape=720p [--remat=save_attention]
        [--precision=fp32_master|reference_bf16] [--backend=auto] [--set ema.offload=True ...]
        [--dump=/tmp/xla_dump] [--top=30] [--json=out.json]

``--tiny`` runs the tiny config on CPU (the test of this script).
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from v2w_jax.models import dit
from v2w_jax.training import memory as memory_lib

GIB = 2**30
_DUMP_MODULES = r".*(train_step|ema_step).*"


# ---- 1. residuals saved by autodiff ----------------------------------------------------------------


def residuals(setup: common.StepSetup) -> dict[str, Any]:
  """The DiT loss's saved residuals (w.r.t. the parameters) at the step's batch shapes."""
  from jax._src import ad_checkpoint  # pylint: disable=import-outside-toplevel

  cfg = setup.dit_cfg
  b = setup.batch["latents"].shape[0]
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), setup.abstract_state.params)
  lat, text, pad = (setup.batch[k] for k in ("latents", "text_embeddings", "padding_mask"))
  as_sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
  inputs = (as_sds(lat), jax.ShapeDtypeStruct((b, 1), jnp.float32), as_sds(text),
            jax.ShapeDtypeStruct((b, 1, *lat.shape[2:]), jnp.float32), as_sds(pad))

  def loss(p, *args):
    return jnp.mean(dit.DiT(cfg).apply({"params": p}, *args) ** 2)

  with jax.set_mesh(setup.mesh):
    saved = ad_checkpoint.saved_residuals(loss, params, *inputs)
  rows: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
  stacked = other = 0
  for aval, desc in saved:
    if "from the argument" in desc:
      continue
    n = math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
    is_stacked = cfg.scan_blocks and len(aval.shape) > 1 and aval.shape[0] == cfg.num_blocks
    stacked, other = stacked + n * is_stacked, other + n * (not is_stacked)
    where = re.sub(r"\s+", " ", desc.split(" from ")[-1])[-90:]
    row = rows[(aval.str_short(), f"{desc.split(' from ')[0]} @ {where}")]
    row[0], row[1] = row[0] + 1, row[1] + n
  table = sorted(({"shape": s, "source": d, "count": c, "gib": n / GIB} for (s, d), (c, n) in rows.items()),
                 key=lambda r: -r["gib"])
  return {"total_gib": (stacked + other) / GIB, "stacked_over_blocks_gib": stacked / GIB,
          "other_gib": other / GIB, "rows": table}


# ---- 3. XLA buffer assignment (dump) ----------------------------------------------------------------

_LIVE = re.compile(r"^\s+(\S+?)\{([\d,]*)\}: (\d+) bytes")
_VALUE = re.compile(r"value: <\d+ (\S+?)(?:\{([\d,]*)\})? @\d+> \(size=(\d+),offset=\d+\): (\S+)")
_OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"')


def _latest(pattern: str) -> str | None:
  files = sorted(glob.glob(pattern), key=os.path.getmtime)
  return files[-1] if files else None


def _kind(name: str) -> str:
  if name.startswith("state"):
    return "train state"
  if name.startswith("batch"):
    return "batch"
  if name.startswith("while") or name.startswith("get-tuple-element"):
    return "loop-carried (stacked residuals, gradient accumulators)"
  return "temporaries"


def buffers(dump_dir: str, module: str, top: int) -> dict[str, Any]:
  """Live buffers at the schedule's peak for the newest dump of ``module`` (e.g. 'jit_train_step')."""
  live_path = _latest(os.path.join(dump_dir, f"*{module}*after_optimizations-live-range.txt"))
  values_path = _latest(os.path.join(dump_dir, f"*{module}*after_optimizations-buffer-assignment.txt"))
  hlo_path = _latest(os.path.join(dump_dir, f"*{module}*after_optimizations.txt"))
  if not values_path:
    return {"error": f"no buffer assignment for {module} in {dump_dir}"}
  shapes: dict[str, str] = {}
  sizes: dict[str, int] = {}
  with open(values_path) as f:
    for line in f:
      m = _VALUE.search(line)
      if m:
        key = f"{m.group(1)}{{{m.group(2) or ''}}}"
        shapes.setdefault(key, m.group(4).split("{")[0])
        sizes[key] = max(sizes.get(key, 0), int(m.group(3)))
  op_names: dict[str, str] = {}
  if hlo_path:
    with open(hlo_path) as f:
      for line in f:
        m = _OP_NAME.match(line)
        if m:
          op_names.setdefault(m.group(1), m.group(2))
  live: list[tuple[str, int]] = []
  if live_path:
    with open(live_path) as f:
      text = f.read()
    start = text.find("(peak):")
    end = text.find("Stack trace breakdown", start)
    for line in text[start:end if end > 0 else None].splitlines()[1:]:
      m = _LIVE.match(line)
      if m:
        live.append((f"{m.group(1)}{{{m.group(2)}}}", int(m.group(3))))
  source = "live at the peak" if live else "largest values (no live-range dump)"
  if not live:
    live = sorted(sizes.items(), key=lambda kv: -kv[1])[: 10 * top]
  by_kind: dict[str, int] = collections.Counter()
  for name, n in live:
    by_kind[_kind(name)] += n
  rows = []
  for name, n in sorted(live, key=lambda kv: -kv[1])[:top]:
    base = name.split("{")[0]
    rows.append({"gib": n / GIB, "shape": shapes.get(name) or shapes.get(f"{base}{{}}", "?"), "buffer": name,
                 "kind": _kind(name), "op_name": op_names.get(base, "")[-160:]})
  return {"module": module, "source": source, "files": [p for p in (live_path, values_path, hlo_path) if p],
          "total_gib": sum(n for _, n in live) / GIB, "by_kind_gib": {k: v / GIB for k, v in by_kind.items()},
          "rows": rows}


# ---- driver -------------------------------------------------------------------------------------------


def report(shape: str, remat: str | None, precision: str, backend: str, mesh_sizes: dict[str, int],
           overrides: dict[str, Any], dump_dir: str | None, top: int, with_residuals: bool) -> dict[str, Any]:
  config = common.bench_config(shape, remat=remat, precision=precision, backend=backend, mesh_sizes=mesh_sizes,
                               overrides=overrides)
  setup = common.build_step(config)
  out: dict[str, Any] = {"shape": shape, "remat": config.model.remat_policy, "precision": precision,
                         "attention_backend": backend, "overrides": overrides, "mesh": dict(setup.mesh.shape)}
  if with_residuals:
    try:
      out["residuals"] = residuals(setup)
    except Exception as err:  # noqa: BLE001 - e.g. cuDNN attention does not trace on CPU
      out["residuals"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
  t0 = time.perf_counter()
  compiled = setup.train_step.compile(setup.abstract_state, setup.batch, jax.random.key(0))
  out["compile_s"] = time.perf_counter() - t0
  mem = memory_lib.step_memory(compiled, setup.abstract_state)
  out["compiled"] = mem.as_dict()
  out["summary"] = mem.summary()
  if dump_dir:
    out["buffers"] = {name: buffers(dump_dir, f"jit_{'ema_step' if name == 'ema' else 'train_step'}", top)
                      for name in compiled.programs}
  return out


def _print(out: dict[str, Any]) -> None:
  print(out["summary"])
  for p in out["compiled"]["programs"]:
    print(f"  program {p['name']}: arguments {p['arguments_gib']:.2f} GiB, outputs {p['outputs_gib']:.2f}, "
          f"aliased {p['aliased_gib']:.2f}, temporaries {p['temporaries_gib']:.2f}, peak {p['peak_gib']:.2f} "
          f"(XLA's own peak figure {p['compiler_peak_gib']:.2f}; host arguments {p['host_arguments_gib']:.2f})")
  res = out.get("residuals")
  if res and "rows" in res:
    print(f"saved residuals: {res['total_gib']:.2f} GiB ({res['stacked_over_blocks_gib']:.2f} stacked over blocks)")
    for r in res["rows"][:15]:
      print(f"  {r['gib']:8.3f} GiB  x{r['count']:<3d} {r['shape']:<34s} {r['source']}")
  elif res:
    print(f"saved residuals: {res['error']}")
  for name, b in (out.get("buffers") or {}).items():
    if "error" in b:
      print(f"buffers of {name}: {b['error']}")
      continue
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in sorted(b["by_kind_gib"].items(), key=lambda kv: -kv[1]))
    print(f"buffers of {name} ({b['source']}): {b['total_gib']:.2f} GiB = {kinds}")
    for r in b["rows"]:
      print(f"  {r['gib']:8.3f} GiB  {r['shape']:<30s} {r['buffer']:<28s} {r['op_name']}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="720p", choices=sorted(common.SHAPES))
  ap.add_argument("--tiny", action="store_true", help="the tiny config (CPU)")
  ap.add_argument("--remat", default=None)
  ap.add_argument("--precision", default="fp32_master", choices=["fp32_master", "reference_bf16"])
  ap.add_argument("--backend", default="auto")
  for axis in ("data", "fsdp", "context"):
    ap.add_argument(f"--{axis}", type=int, default=1)
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  ap.add_argument("--dump", default=None, help="XLA dump folder: adds the buffer-assignment view")
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--no_residuals", action="store_true")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  if args.dump:  # read when the backend starts, which has not happened yet
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), f"--xla_dump_to={args.dump}",
                                        "--xla_dump_hlo_as_text", f"--xla_dump_hlo_module_re={_DUMP_MODULES}"])
    # A program taken from the persistent compilation cache is not compiled, so XLA would dump nothing.
    jax.config.update("jax_enable_compilation_cache", False)
  shape = "tiny" if args.tiny else args.shape
  out = report(shape, args.remat, args.precision, args.backend,
               dict(data=args.data, fsdp=args.fsdp, context=args.context), common.parse_overrides(args.set),
               args.dump, args.top, not args.no_residuals)
  out = {"device": common.device_info(), "result": out}
  _print(out["result"])
  common.write_json(args.json, out)


if __name__ == "__main__":
  main()
