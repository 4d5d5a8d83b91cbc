"""A CPU stand-in for flash-attn3-jax's ``flash_mha``, for tests of the FA3 wiring without a Hopper GPU.

Same interface as the package where the model uses it: ``flash_mha(q, k, v, softmax_scale, is_causal)``
on bf16 ``[B, L, heads, head_dim]``; a ``jax.custom_vjp`` whose forward binds a primitive named
``flash_mha_fwd`` returning (output, float32 log-sum-exp ``[B, heads, Lq]``) and whose backward uses
only (q, k, v, output, LSE, dout), as FA3's does. The math is plain XLA (float32 inside), so it runs on
CPU; the backward is FlashAttention's recomputation from the LSE.

``install(monkeypatch)`` makes ``v2w_jax.models.fa3`` see this kernel and every device as a Hopper GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import mlir

FWD_NAME = "flash_mha_fwd"


def _forward(q, k, v, *, softmax_scale):
  s = jnp.einsum("blhd,bmhd->bhlm", q.astype(jnp.float32), k.astype(jnp.float32)) * softmax_scale
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  out = jnp.einsum("bhlm,bmhd->blhd", p, v.astype(jnp.float32))
  return out.astype(q.dtype), lse


def _fwd_abstract(q, k, v, *, softmax_scale):
  del k, v, softmax_scale
  b, l, h, _ = q.shape
  return jax.core.ShapedArray(q.shape, q.dtype), jax.core.ShapedArray((b, h, l), jnp.float32)


fwd_p = Primitive(FWD_NAME)
fwd_p.multiple_results = True
fwd_p.def_abstract_eval(_fwd_abstract)
fwd_p.def_impl(jax.jit(_forward, static_argnames="softmax_scale"))
mlir.register_lowering(fwd_p, mlir.lower_fun(_forward, multiple_results=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mha(q, k, v, softmax_scale):
  return fwd_p.bind(q, k, v, softmax_scale=softmax_scale)[0]


def _mha_fwd(q, k, v, softmax_scale):
  out, lse = fwd_p.bind(q, k, v, softmax_scale=softmax_scale)
  return out, (q, k, v, out, lse)


def _mha_bwd(softmax_scale, res, dout):
  q, k, v, out, lse = res
  f32 = lambda a: a.astype(jnp.float32)
  s = jnp.einsum("blhd,bmhd->bhlm", f32(q), f32(k)) * softmax_scale
  p = jnp.exp(s - lse[..., None])
  dv = jnp.einsum("bhlm,blhd->bmhd", p, f32(dout))
  dp = jnp.einsum("blhd,bmhd->bhlm", f32(dout), f32(v))
  delta = jnp.einsum("blhd,blhd->bhl", f32(dout), f32(out))
  ds = p * (dp - delta[..., None]) * softmax_scale
  dq = jnp.einsum("bhlm,bmhd->blhd", ds, f32(k))
  dk = jnp.einsum("bhlm,blhd->bmhd", ds, f32(q))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_mha.defvjp(_mha_fwd, _mha_bwd)


def flash_mha(q, k, v, softmax_scale=None, is_causal=False, window_size=(-1, -1)):
  assert not is_causal and tuple(window_size) == (-1, -1)
  assert q.dtype == k.dtype == v.dtype and q.dtype in (jnp.bfloat16, jnp.float16)
  scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
  assert type(scale) is float  # the package requires a Python float
  return _mha(q, k, v, scale)


def install(monkeypatch) -> None:
  """Route ``v2w_jax.models.fa3`` to this kernel, with every device taken for a Hopper GPU."""
  from v2w_jax.models import fa3  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(fa3, "_load", lambda: (flash_mha, None))
  monkeypatch.setattr(fa3, "is_hopper", lambda device: True)
