"""GPU checks of the 2B DiT (issue 2 item 7).

1. Numerics: the 2B network at a small latent gives the same output with cuDNN attention in bf16
   as with XLA attention in fp32 (bf16 tolerance).
2. A forward+backward at the real 720p latent (1x16x24x88x160, 512 text tokens) with the
   attention-saving remat policy: compile time, step time, peak memory, and the number of cuDNN
   attention forward kernels in the compiled program (2 per block-scan body = forward + backward
   only means the softmax statistics were saved; 3 means the forward is recomputed).

    python -m benchmarks.dit_check --json=out.json [--tiny]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from configs import nemo, tiny
from v2w_jax.models import dit
from v2w_jax.models.attention import resolve_backend
from v2w_jax.models.dit_config import DiTConfig


def _cfg(base, **kw) -> DiTConfig:
  return DiTConfig.from_config(base, **kw)


def _inputs(cfg: DiTConfig, t: int, h: int, w: int, text: int, seed: int = 0):
  k = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k[0], (1, cfg.in_channels, t, h, w), jnp.float32)
  ts = jnp.full((1, 1), 700.0, jnp.float32)
  ctx = jax.random.normal(k[1], (1, text, cfg.text_in_channels), jnp.float32).astype(jnp.bfloat16)
  mask = jnp.zeros((1, 1, t, h, w), jnp.float32).at[:, :, :1].set(1.0)
  return x, ts, ctx, mask


def numerics(base, shape, text) -> dict:
  t, h, w = shape
  ref_cfg = _cfg(base, dtype="float32", attention_backend="xla", remat_policy="none")
  fast_cfg = _cfg(base, dtype="bfloat16", attention_backend="auto", remat_policy="none")
  params = jax.jit(lambda k: dit.init_params(ref_cfg, k))(jax.random.key(1))
  inputs = _inputs(ref_cfg, t, h, w, text)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(dit.apply_fn(ref_cfg))(params, *inputs)
  fast = jax.jit(dit.apply_fn(fast_cfg))(params, *inputs)
  ref, fast = np.asarray(ref, np.float64), np.asarray(fast, np.float64)
  return {
      "latent": [t, h, w],
      "backend_fast": resolve_backend(fast_cfg.attention_backend),
      "max_abs": float(np.max(np.abs(ref - fast))),
      "rel_l2": float(np.linalg.norm(ref - fast) / np.linalg.norm(ref)),
      "ref_std": float(ref.std()),
  }


def fwd_bwd(base, shape, text, remat) -> dict:
  t, h, w = shape
  cfg = _cfg(base, dtype="bfloat16", attention_backend="auto", remat_policy=remat)
  params = jax.jit(lambda k: dit.init_params(cfg, k))(jax.random.key(1))
  inputs = _inputs(cfg, t, h, w, text)
  f = dit.apply_fn(cfg)

  def loss(p, x, ts, ctx, mask):
    return jnp.mean(jnp.square(f(p, x, ts, ctx, mask)))

  step = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  compiled = step.lower(params, *inputs).compile()
  compile_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  timing = common.time_calls(lambda: compiled(params, *inputs), warmup=1, steps=3)
  return {
      "latent": [t, h, w],
      "remat": remat,
      "compile_s": compile_s,
      **timing,
      "peak_gib": common.peak_memory_gib(),
      "cudnn_fmha_calls": common.count_in_hlo(hlo, "__cudnn$fmha"),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--json", default=None)
  ap.add_argument("--tiny", action="store_true", help="CPU smoke test at toy sizes")
  ap.add_argument("--skip_numerics", action="store_true")
  args = ap.parse_args()
  if args.tiny:
    base, small, big, text = tiny.get_config().model, (2, 8, 8), (4, 16, 16), 8
  else:
    base, small, big, text = nemo.model_2b(), (8, 32, 32), (24, 88, 160), 512
  out = {"device": common.device_info()}
  if not args.skip_numerics:
    out["numerics"] = numerics(base, small, text)
    print("numerics", out["numerics"], flush=True)
  out["fwd_bwd"] = fwd_bwd(base, big, text, "save_attention")
  print("fwd_bwd", out["fwd_bwd"], flush=True)
  common.write_json(args.json, out)


if __name__ == "__main__":
  main()
