"""FlashAttention-3 (Hopper) through the optional ``flash-attn3-jax`` package (``pip install '.[fa3]'``).

The kernel is FA3's own CUDA code behind an XLA FFI call: ``flash_mha(q, k, v)`` on ``[B, L, heads,
head_dim]`` (BTNH) bf16 arrays, non-causal, softmax scale 1/sqrt(head_dim), with different query and
key/value lengths allowed (cross-attention). Its forward primitive ``flash_mha_fwd`` returns the output
and the softmax log-sum-exp; the backward primitive needs both, so the remat policies save that
primitive's outputs (``remat.py``). Under a mesh the package partitions the kernel itself (q, k and v
must share one sharding, which ``attention.same_sharding`` provides); inside the context-parallel
``shard_map`` it runs as a plain per-device call.

The published wheels are built for sm90 (H100/H200/H800) and head dimension 128 only, so the kernel is
*available* only when the package imports and the device is a Hopper GPU, and *applies* only to
head dimension 128 (the 2B DiT's 2048/16).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Name of the package's forward primitive (its outputs: attention output, softmax LSE).
FWD_PRIMITIVE = "flash_mha_fwd"
# Head dims the published flash-attn3-jax wheels are compiled for.
SUPPORTED_HEAD_DIMS = (128,)
# Device kinds of sm90 parts, for devices that do not report a compute capability.
_HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")


@functools.cache
def _load() -> tuple[Callable[..., jax.Array] | None, str | None]:
  """(flash_mha, None) when the package imports, else (None, why not)."""
  try:
    from flash_attn3_jax import flash_mha  # pylint: disable=import-outside-toplevel
  except Exception as err:  # noqa: BLE001 - ImportError, or OSError from its CUDA libraries
    return None, f"{type(err).__name__}: {err}"
  return flash_mha, None


def import_error() -> str | None:
  """Why ``flash_attn3_jax`` does not import here (None when it does)."""
  return _load()[1]


def is_hopper(device: Any) -> bool:
  """True for an sm90 GPU (compute capability 9.x, or a Hopper device kind)."""
  if getattr(device, "platform", None) not in ("gpu", "cuda"):
    return False
  capability = str(getattr(device, "compute_capability", "") or "")
  if capability:
    return capability.split(".")[0] == "9"
  kind = str(getattr(device, "device_kind", ""))
  return any(k in kind for k in _HOPPER_KINDS)


def unavailable_reason(device: Any = None) -> str | None:
  """None when the FA3 kernel can run on ``device`` (default: the first device), else why not."""
  device = jax.devices()[0] if device is None else device
  if not is_hopper(device):
    kind = getattr(device, "device_kind", getattr(device, "platform", "?"))
    return f"FlashAttention-3 needs a Hopper (sm90) GPU, this device is {kind}"
  err = import_error()
  if err is not None:
    return f"the flash-attn3-jax package does not import ({err}); install it with pip install '.[fa3]'"
  return None


def supports(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
  """Whether the kernel handles these ``[B, L, heads, head_dim]`` shapes (any q/kv lengths)."""
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4:
    return False
  same = q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2] and q.shape[3] == k.shape[3]
  return same and q.shape[3] in SUPPORTED_HEAD_DIMS


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q·kᵀ/√d)·v with the FA3 kernel; q/k/v are cast to bf16, the output is bf16."""
  flash_mha, err = _load()
  if flash_mha is None:
    raise ValueError(f"attention backend 'fa3': the flash-attn3-jax package does not import ({err})")
  q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
  return flash_mha(q, k, v, softmax_scale=1.0 / math.sqrt(q.shape[-1]), is_causal=False)
