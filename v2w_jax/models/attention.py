"""The single attention op of the DiT: full softmax attention, no mask, scale 1/sqrt(head_dim).

Blocks call :func:`dot_product_attention` with a backend *name* (the local kernel) and the logical
axis rules. When the ambient mesh (``jax.set_mesh``) splits the ``act_length`` logical axis over more
than one device, the kernel runs inside ``shard_map`` (``v2w_jax/parallel/context_attention.py``):
Ulysses all-to-alls for self-attention, sequence-sharded queries for cross-attention. Model code never
names a mesh axis.

The output is tagged with :data:`ATTENTION_OUT_NAME` (``checkpoint_name``) so the
``save_attention`` remat policy (``remat.py``) can keep it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from v2w_jax.parallel import context_attention
from v2w_jax.parallel import rules as R

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


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, backend: str,
                          logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
                          self_attention: bool = True) -> jnp.ndarray:
  """softmax(q·kᵀ/√d)·v over ``[B, L, heads, head_dim]`` ("BLHD") inputs.

  Args:
    q: queries ``[B, Lq, H, D]``.
    k, v: keys / values ``[B, Lk, H, D]``.
    backend: the local kernel: 'cudnn' (fused cuDNN kernel; q/k/v cast to bf16 as the reference
      does), 'xla' (in the input dtype), or 'auto'.
    logical_axis_rules: the model's rules; given, and the ambient mesh splits ``act_length`` (the
      video tokens, here q's ``Lq``) over devices, attention is context-parallel. None: never.
    self_attention: k/v are the same token sequence as q (Ulysses all-to-all); False: k/v are a
      separate short sequence (text) kept whole on every device.

  Returns:
    ``[B, Lq, H, D]`` in q's dtype.
  """
  kernel = functools.partial(local_attention, backend=resolve_backend(backend))
  plan = None if logical_axis_rules is None else context_attention.context_parallel_plan(logical_axis_rules)
  if plan is None:
    if logical_axis_rules is not None:
      q, k, v = same_sharding(q, k, v, logical_axis_rules)
    return kernel(q, k, v)
  if self_attention:
    return context_attention.ulysses_attention(q, k, v, kernel, plan)
  return context_attention.query_sharded_attention(q, k, v, kernel, plan)


def same_sharding(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                  logical_axis_rules: Sequence[tuple[str, Any]]) -> tuple[jnp.ndarray, ...]:
  """q, k and v laid out alike: batch over the data axes, heads per the rules, the rest whole.

  cuDNN's partitioner requires one sharding for q, k and v; left to propagation, FSDP gives them
  different ones (k/v of cross-attention come from the text, q from the video tokens) and the
  compile fails with "Query, key and value should have same sharding".
  """
  names = (R.ACT_BATCH, None, R.ACT_HEADS, None)
  return tuple(nn.with_logical_constraint(a, names, rules=logical_axis_rules) for a in (q, k, v))


def local_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, backend: str) -> jnp.ndarray:
  """The kernel on whole sequences (no mesh logic); output tagged :data:`ATTENTION_OUT_NAME`."""
  backend = resolve_backend(backend)
  out_dtype = q.dtype
  if backend == "cudnn":
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  else:
    out = jax.nn.dot_product_attention(q, k, v, implementation="xla")
  out = checkpoint_name(out, ATTENTION_OUT_NAME)
  return out.astype(out_dtype)
