"""Benchmark Wan2.1 VAE encode/decode of one clip (default 93x704x1280, bf16).

Reports per function: compile time, median wall time over ``--runs`` (after ``--warmup``), model
TFLOP/s (convolution and matmul FLOPs counted on the jaxpr), XLA's planned temporary memory and the measured extra peak device
memory (``memory_stats()['peak_bytes_in_use']`` minus bytes in use before the call; the peak is
process-wide, so run ``--only encode`` / ``--only decode`` for a clean figure per function).

  python benchmarks/vae.py --json /tmp/vae.json               # GPU, full size, random weights
  python benchmarks/vae.py --checkpoint Wan2.1_VAE.pth        # converted real weights
  python benchmarks/vae.py --tiny                              # CPU smoke test (dim 8, 9x32x48)

Targets on one H200 (reference PyTorch: encode 2.45 s / 18.8 GiB, decode 4.24 s / 9.3 GiB):
encode <= 2.0 s with <= 20 GiB extra peak, decode <= 3.5 s.

Measured on one H200 (jax 0.11.2, random weights, defaults encode_chunk 4 / decode_chunk 1):
encode 1.46 s (~294 TFLOP/s of the 4.28e14 counted), 6.8 GiB extra peak, 14 s compile;
decode 2.40 s (~299 TFLOP/s of 7.17e14), 9.8 GiB extra peak, 15 s compile. encode_chunk 8:
same time, 10.1 GiB.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from v2w_jax.models import vae as vae_lib  # noqa: E402

GIB = 1024**3


def _parse(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--frames", type=int, default=93)
  p.add_argument("--height", type=int, default=704)
  p.add_argument("--width", type=int, default=1280)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--base-dim", type=int, default=96)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--encode-chunk", type=int, default=None, help="pixel frames per scan step")
  p.add_argument("--decode-chunk", type=int, default=None, help="latent frames per scan step")
  p.add_argument("--runs", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--only", choices=["encode", "decode"], default=None)
  p.add_argument("--checkpoint", default="", help="Wan2.1_VAE.pth to convert (default: random)")
  p.add_argument("--tiny", action="store_true", help="CPU smoke test: dim 8, 1x3x9x32x48, 1 run")
  p.add_argument("--json", default="", help="write the results here")
  args = p.parse_args(argv)
  if args.tiny:
    args.frames, args.height, args.width, args.base_dim, args.runs = 9, 32, 48, 8, 1
  return args


def _mem() -> dict | None:
  try:
    return jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None


def _random_params(cfg: vae_lib.VAEConfig, seed: int = 0):
  """Host-side random weights (no init compile): kernels ~ N(0, 1/fan_in), gains 1, biases 0."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(a.shape[:-1]))
      return (rng.standard_normal(a.shape, np.float32) / np.sqrt(fan_in)).astype(a.dtype)
    return (np.ones if "scale" in name else np.zeros)(a.shape, a.dtype)

  return jax.device_put(jax.tree_util.tree_map_with_path(leaf, vae_lib.abstract_params(cfg)))


def _params(cfg: vae_lib.VAEConfig, checkpoint: str):
  if not checkpoint:
    return _random_params(cfg)
  from v2w_jax.convert import torch_pt  # pylint: disable=import-outside-toplevel
  from v2w_jax.convert import vae as convert_vae  # pylint: disable=import-outside-toplevel
  return jax.device_put(convert_vae.torch_to_params(torch_pt.load(checkpoint), cfg))


def _jaxpr_flops(jaxpr) -> float:
  """FLOPs (2 per multiply-add) of convolutions and matmuls, scan bodies times their length."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      lhs, rhs = (v.aval for v in eqn.invars[:2])
      out = eqn.outvars[0].aval
      dn = eqn.params["dimension_numbers"]
      k_spatial = int(np.prod([rhs.shape[i] for i in dn.rhs_spec[2:]]))
      cin = rhs.shape[dn.rhs_spec[1]]
      total += 2.0 * float(np.prod(out.shape)) * k_spatial * cin
    elif name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      contracted = int(np.prod([lhs.shape[i] for i in lc]))
      total += 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * contracted
    mult = eqn.params.get("length", 1) if name == "scan" else 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += mult * _jaxpr_flops(sub)
  return total


def model_flops(fn, *args) -> float:
  """Model FLOPs of ``fn(*args)`` counted on its jaxpr (convs + matmuls, as torch's counter does)."""
  return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def _bench(name: str, fn, params, x, runs: int, warmup: int) -> dict:
  jitted = jax.jit(fn)
  t0 = time.perf_counter()
  compiled = jitted.lower(params, x).compile()
  compile_s = time.perf_counter() - t0
  res: dict = {"name": name, "compile_s": compile_s}
  res["flops"] = model_flops(fn, params, x)
  try:
    ma = compiled.memory_analysis()
    res["xla_temp_gib"] = ma.temp_size_in_bytes / GIB
    res["xla_output_gib"] = ma.output_size_in_bytes / GIB
  except Exception:  # pylint: disable=broad-except
    pass
  before = _mem()
  for _ in range(warmup):
    jax.block_until_ready(compiled(params, x))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, x))
    times.append(time.perf_counter() - t0)
  after = _mem()
  res["times_s"] = times
  res["median_s"] = statistics.median(times)
  res["out_shape"] = list(out.shape)
  res["out_finite"] = bool(jnp.isfinite(out).all())
  if before and after and "peak_bytes_in_use" in after:
    res["extra_peak_gib"] = (after["peak_bytes_in_use"] - before["bytes_in_use"]) / GIB
  if res.get("flops"):
    res["tflops_per_s"] = res["flops"] / res["median_s"] / 1e12
  del out
  return res


def main(argv: list[str] | None = None) -> list[dict]:
  args = _parse(argv)
  overrides = {}
  if args.encode_chunk:
    overrides["encode_chunk"] = args.encode_chunk
  if args.decode_chunk:
    overrides["decode_chunk"] = args.decode_chunk
  cfg = vae_lib.VAEConfig(base_dim=args.base_dim, dtype=args.dtype, **overrides)
  vae_lib.check_video(jax.ShapeDtypeStruct((args.batch, 3, args.frames, args.height, args.width),
                                           jnp.float32), cfg, "benchmarks/vae.py")
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; cfg: {cfg}")
  params = _params(cfg, args.checkpoint)
  key = jax.random.key(1)
  video = jax.random.uniform(key, (args.batch, 3, args.frames, args.height, args.width),
                             jnp.bfloat16, -1.0, 1.0)
  sf = cfg.spatial_factor
  lat_shape = (args.batch, cfg.z_dim, 1 + (args.frames - 1) // cfg.temporal_factor,
               args.height // sf, args.width // sf)
  latents = jax.random.normal(key, lat_shape, jnp.float32)
  results = []
  if args.only in (None, "encode"):
    results.append(_bench("encode", functools.partial(vae_lib.encode_video, cfg), params, video,
                          args.runs, args.warmup))
  if args.only in (None, "decode"):
    results.append(_bench("decode", functools.partial(vae_lib.decode_latents, cfg), params, latents,
                          args.runs, args.warmup))
  hdr = f"{'fn':8s} {'median s':>9s} {'compile s':>10s} {'TFLOP/s':>8s} {'xla temp GiB':>13s} " \
        f"{'extra peak GiB':>15s}  out"
  print(hdr)
  print("-" * len(hdr))
  for r in results:
    tf = f"{r['tflops_per_s']:.0f}" if r.get("tflops_per_s") else "-"
    temp = f"{r['xla_temp_gib']:.2f}" if "xla_temp_gib" in r else "-"
    peak = f"{r['extra_peak_gib']:.2f}" if "extra_peak_gib" in r else "-"
    print(f"{r['name']:8s} {r['median_s']:9.3f} {r['compile_s']:10.1f} {tf:>8s} {temp:>13s} "
          f"{peak:>15s}  {r['out_shape']}")
  if args.json:
    meta = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "shape": [args.batch, 3, args.frames, args.height, args.width],
            "config": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in vars(cfg).items()},
            "checkpoint": args.checkpoint or "random"}
    pathlib.Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.json}")
  return results


if __name__ == "__main__":
  main()
