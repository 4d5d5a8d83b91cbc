"""The single attention op of the DiT: full softmax attention, no mask, scale 1/sqrt(head_dim).

Blocks call :func:`dot_product_attention` with a backend *name*; adding a backend (e.g. a Ulysses
context-parallel wrapper doing all-to-alls over the mesh ``context`` axis inside ``shard_map``
around the cuDNN call) means adding a branch here, without touching the blocks.

The output is tagged with :data:`ATTENTION_OUT_NAME` (``checkpoint_name``) so the
``save_attention`` remat policy (``remat.py``) can keep it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

ATTENTION_OUT_NAME = "attention_out"
BACKENDS = ("auto", "cudnn", "xla")


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """Concrete backend for a config value: 'auto' → 'cudnn' on GPU, else 'xla'."""
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
  if backend != "auto":
    return backend
  platform = jax.default_backend() if platform is None else platform
  return "cudnn" if platform in ("gpu", "cuda") else "xla"


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, backend: str) -> jnp.ndarray:
  """softmax(q·kᵀ/√d)·v over ``[B, L, heads, head_dim]`` ("BLHD") inputs.

  Args:
    q: queries ``[B, Lq, H, D]``.
    k, v: keys / values ``[B, Lk, H, D]``.
    backend: 'cudnn' (fused cuDNN kernel; q/k/v cast to bf16 as the reference does), 'xla' (in
      the input dtype), or 'auto'.

  Returns:
    ``[B, Lq, H, D]`` in q's dtype.
  """
  backend = resolve_backend(backend)
  out_dtype = q.dtype
  if backend == "cudnn":
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  else:
    out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  out = checkpoint_name(out, ATTENTION_OUT_NAME)
  return out.astype(out_dtype)
