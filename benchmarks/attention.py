"""One self-attention layer at the 720p shape, forward and forward+backward, per kernel (issue 9).

Kernels: cuDNN through ``jax.nn.dot_product_attention`` (BTNH, what the DiT uses), cuDNN with
the BNTH layout, FlashAttention-3 (``v2w_jax/models/fa3.py``, when flash-attn3-jax imports on a Hopper
GPU) and the Pallas Mosaic-GPU (Hopper) flash attention with a few tilings. Prints ms and
TFLOP/s (4·L²·H·D forward, 2.5x that for the backward, as FlashAttention counts).

    python -m benchmarks.attention --json=out.json [--seq=84480]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import common
from v2w_jax.models import fa3


def _cudnn_btnh(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def _cudnn_bnth(q, k, v):
  from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=import-outside-toplevel

  t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
  out = fa.dot_product_attention(t(q), t(k), t(v), scale=q.shape[-1] ** -0.5, qkv_layout="BNTH")
  return t(out)


def _mgpu(config, q, k, v):
  from jax.experimental.pallas.ops.gpu import attention_mgpu  # pylint: disable=import-outside-toplevel

  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  return attention_mgpu.attention(q, k, v, config)


def kernels():
  out = {"cudnn_btnh": _cudnn_btnh, "cudnn_bnth": _cudnn_bnth}
  if fa3.unavailable_reason() is None:
    out["fa3"] = fa3.attention
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am  # pylint: disable=import-outside-toplevel
  except Exception:  # noqa: BLE001 - not available on this jax/platform
    return out
  for bq, bkv, steps in ((64, 128, 2), (64, 64, 2), (128, 128, 2)):
    for dkv in ((64, 128, 128, 64), (64, 64, 64, 64)):
      cfg = am.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps, block_q_dkv=dkv[0],
                            block_kv_dkv=dkv[1], block_q_dq=dkv[2], block_kv_dq=dkv[3])
      out[f"mgpu_q{bq}_kv{bkv}_bwd{'-'.join(map(str, dkv))}"] = functools.partial(_mgpu, cfg)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seq", type=int, default=84480)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--head_dim", type=int, default=128)
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  shape = (1, args.seq, args.heads, args.head_dim)
  ks = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(kk, shape, jnp.bfloat16) for kk in ks)
  fwd_flops = 4.0 * args.seq * args.seq * args.heads * args.head_dim
  ref = jax.jit(_cudnn_btnh)(q, k, v)
  results = {}
  for name, fn in kernels().items():
    try:
      fwd = jax.jit(fn)
      out = fwd(q, k, v)
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
      t_f = common.time_calls(lambda: fwd(q, k, v), warmup=1, steps=5)["median_s"]
      bwd = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v)[1](do))
      t_fb = common.time_calls(lambda: bwd(q, k, v), warmup=1, steps=5)["median_s"]
      results[name] = {"fwd_ms": t_f * 1e3, "fwd_bwd_ms": t_fb * 1e3,
                       "fwd_tflops": fwd_flops / t_f / 1e12,
                       "fwd_bwd_tflops": 3.5 * fwd_flops / t_fb / 1e12, "max_abs_vs_cudnn": err}
    except Exception as e:  # noqa: BLE001 - report and continue with the next kernel
      results[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    print(name, results[name], flush=True)
  common.write_json(args.json, {"device": common.device_info(), "shape": shape, "results": results})


if __name__ == "__main__":
  main()
