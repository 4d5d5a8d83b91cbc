"""The single attention op of the DiT: full softmax attention, no mask, scale 1/sqrt(head_dim).

Blocks call :func:`dot_product_attention` with a backend *name* (the local kernel) and the logical
axis rules. When the ambient mesh (``jax.set_mesh``) splits the ``act_length`` logical axis over more
than one device, the kernel runs inside ``shard_map`` (``v2w_jax/parallel/context_attention.py``):
Ulysses all-to-alls for self-attention, sequence-sharded queries for cross-attention. Model code never
names a mesh axis.

Local kernels (``attention_backend``): ``fa3`` (FlashAttention-3 on Hopper GPUs, ``fa3.py``), ``cudnn``
(``jax.nn.dot_product_attention``'s cuDNN kernel) and ``xla`` (plain XLA ops; CPU, tests). ``auto`` picks
cuDNN on GPUs and XLA elsewhere; ``fa3`` is opt-in (measured slower in the full step so far: its
forward kernel runs twice per block in the compiled program).

What the ``save_attention`` remat policy (``remat.py``) keeps: for the fused kernels, the outputs of their
forward primitive (attention output *and* softmax statistics, which their backward needs); for XLA, the
output tagged :data:`ATTENTION_OUT_NAME`. Only one of the two exists per kernel on purpose: naming a
fused kernel's output as well would make a scan over blocks keep the same tensor twice (two stacked
residuals of ``blocks x tokens x D`` each).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from v2w_jax.models import fa3
from v2w_jax.parallel import context_attention
from v2w_jax.parallel import rules as R

ATTENTION_OUT_NAME = "attention_out"
BACKENDS = ("auto", "fa3", "cudnn", "xla")
_GPU_PLATFORMS = ("gpu", "cuda")


def _first_device(platform: str | None) -> Any:
  try:
    return jax.devices(platform)[0] if platform else jax.devices()[0]
  except RuntimeError:  # no device of that platform here
    return None


def resolve_backend(backend: str, platform: str | None = None, device: Any = None) -> str:
  """Concrete backend for a config value.

  'auto' → 'cudnn' on GPUs, 'xla' on other platforms. 'fa3' is opt-in: measured on an H200, the full
  720p train step with FA3 took 13.6-13.9 s against cuDNN's 12.3 s, because the compiled program runs
  FA3's forward kernel twice per block (docs/performance.md), so 'auto' keeps cuDNN until that is
  fixed. An explicit 'fa3' that cannot run here raises ValueError saying why.

  Args:
    backend: one of :data:`BACKENDS`.
    platform: 'gpu', 'cpu', ...; default: the device's (or JAX's default backend).
    device: the device to check for FA3 (default: the first device of ``platform``).
  """
  if backend not in BACKENDS:
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
  device = _first_device(platform) if device is None else device
  if backend == "fa3":
    reason = fa3.unavailable_reason(device) if device is not None else f"no {platform} device here"
    if reason:
      raise ValueError(f"attention_backend='fa3': {reason}; use 'auto' or 'cudnn'")
    return "fa3"
  if backend != "auto":
    return backend
  if platform is None:
    platform = device.platform if device is not None else jax.default_backend()
  return "cudnn" if platform in _GPU_PLATFORMS else "xla"


def kernel_for(backend: str, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> str:
  """The local kernel for these q/k/v: :func:`resolve_backend`, then cuDNN where 'auto' chose an FA3
  that does not apply to the shapes (an explicit 'fa3' raises instead)."""
  kernel = resolve_backend(backend)
  if kernel == "fa3" and not fa3.supports(q, k, v):
    if backend == "auto":
      return "cudnn"
    raise ValueError(f"attention_backend='fa3' does not apply to q {q.shape}, k {k.shape}: the "
                     f"flash-attn3-jax wheel supports head dims {fa3.SUPPORTED_HEAD_DIMS}; use 'auto' or 'cudnn'")
  return kernel


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, backend: str,
                          logical_axis_rules: Sequence[tuple[str, Any]] | None = None,
                          self_attention: bool = True) -> jnp.ndarray:
  """softmax(q·kᵀ/√d)·v over ``[B, L, heads, head_dim]`` ("BLHD") inputs.

  Args:
    q: queries ``[B, Lq, H, D]``.
    k, v: keys / values ``[B, Lk, H, D]``.
    backend: the local kernel: 'fa3' or 'cudnn' (fused kernels; q/k/v cast to bf16 as the reference
      does), 'xla' (in the input dtype), or 'auto' (see :func:`resolve_backend`).
    logical_axis_rules: the model's rules; given, and the ambient mesh splits ``act_length`` (the
      video tokens, here q's ``Lq``) over devices, attention is context-parallel. None: never.
    self_attention: k/v are the same token sequence as q (Ulysses all-to-all); False: k/v are a
      separate short sequence (text) kept whole on every device.

  Returns:
    ``[B, Lq, H, D]`` in q's dtype.
  """
  name = kernel_for(backend, q, k, v)
  kernel = functools.partial(local_attention, backend=name)
  plan = None if logical_axis_rules is None else context_attention.context_parallel_plan(logical_axis_rules)
  if plan is None:
    if logical_axis_rules is not None:
      q, k, v = same_sharding(q, k, v, logical_axis_rules)
    return kernel(q, k, v)
  # FA3's primitives do not type device-varying values, which shard_map's check would reject.
  check_vma = name != "fa3"
  if self_attention:
    return context_attention.ulysses_attention(q, k, v, kernel, plan, check_vma=check_vma)
  return context_attention.query_sharded_attention(q, k, v, kernel, plan, check_vma=check_vma)


def same_sharding(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                  logical_axis_rules: Sequence[tuple[str, Any]]) -> tuple[jnp.ndarray, ...]:
  """q, k and v laid out alike: batch over the data axes, heads per the rules, the rest whole.

  cuDNN's and FA3's partitioners require one sharding for q, k and v; left to propagation, FSDP gives
  them different ones (k/v of cross-attention come from the text, q from the video tokens) and the
  compile fails with "Query, key and value should have same sharding".
  """
  names = (R.ACT_BATCH, None, R.ACT_HEADS, None)
  return tuple(nn.with_logical_constraint(a, names, rules=logical_axis_rules) for a in (q, k, v))


def local_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, backend: str) -> jnp.ndarray:
  """The kernel on whole sequences (no mesh logic), returned in q's dtype.

  Only the XLA path's output is tagged :data:`ATTENTION_OUT_NAME`: the fused kernels' outputs are kept
  by the remat policy through their forward primitive (see the module docstring).
  """
  backend = resolve_backend(backend)
  out_dtype = q.dtype
  if backend == "fa3":
    out = fa3.attention(q, k, v)
  elif backend == "cudnn":
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  else:
    out = checkpoint_name(jax.nn.dot_product_attention(q, k, v, implementation="xla"), ATTENTION_OUT_NAME)
  return out.astype(out_dtype)
