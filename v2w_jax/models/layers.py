"""Small building blocks of the DiT: partitioned dense layers, norms, AdaLN-LoRA modulation.

Every parameter carries logical axis names (``v2w_jax.parallel.rules``) through
``nn.with_logical_partitioning``; without a mesh they are plain arrays inside ``nn.Partitioned``
boxes (see ``dit.unbox``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from v2w_jax.models.lora import LoRADense, LoRASpec
from v2w_jax.parallel import rules as R

Names = tuple[str | None, ...]
_KERNEL_INIT = nn.initializers.lecun_normal()


def broadcast_fp32_grad(v: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
  """``broadcast_to(v, shape)`` in v's dtype whose gradient accumulates in float32.

  The gradient of a broadcast is a sum over the broadcast axes. JAX sums in the operand's dtype, and
  a bf16 sum over thousands of tokens keeps only a few correct digits; PyTorch accumulates bf16 sums
  in float32. Broadcasting in float32 and rounding back gives the same forward values (the round
  trip is exact) and makes the backward sum ``convert → reduce`` in float32, which XLA fuses into
  the reduction: no token-sized float32 buffer is written.
  """
  return jnp.broadcast_to(v.astype(jnp.float32), shape).astype(v.dtype)


def dense(features: int, names: Names, *, dtype: Any, param_dtype: Any, use_bias: bool = False,
          name: str | None = None, kernel_init: Any = _KERNEL_INIT, lora: LoRASpec | None = None) -> nn.Module:
  """A dense layer with a logically partitioned kernel ``[in, out]`` (and bias ``[out]``).

  Without bias this is ``nn.Dense``; with bias it is :class:`BiasedDense` (same parameters and
  forward, float32-accumulated bias gradient). With a ``lora`` spec (bias-free layers) it carries
  LoRA adapters when its module path is one of the spec's targets (``models/lora.py``); parameters
  and numerics are otherwise those of ``nn.Dense``.
  """
  if use_bias:
    if lora is not None:
      raise ValueError(f"dense layer {name}: LoRA adapters are for bias-free layers")
    return BiasedDense(features, names, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                       name=name)
  kw = dict(
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, names),
      name=name,
  )
  if lora is None:
    return nn.Dense(features, **kw)
  return LoRADense(features, names=tuple(names), lora=lora, **kw)


class BiasedDense(nn.Module):
  """``x·kernel + bias`` with the parameters and forward of ``nn.Dense(use_bias=True)``.

  The bias gradient is a sum over every token; here it accumulates in float32
  (``broadcast_fp32_grad``), as PyTorch's bf16 ``Linear`` does, instead of in the compute dtype.
  """

  features: int
  names: Names
  dtype: Any
  param_dtype: Any
  kernel_init: Any = _KERNEL_INIT

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.names),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.names[1:]),
                      (self.features,), self.param_dtype)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            (((x.ndim - 1,), (0,)), ((), ())))
    return y + broadcast_fp32_grad(bias.astype(self.dtype), y.shape)


def layer_norm(x: jnp.ndarray, eps: float = 1e-6, dtype: Any = None) -> jnp.ndarray:
  """LayerNorm over the last axis without affine parameters; fp32 math, output in ``dtype``."""
  out_dtype = x.dtype if dtype is None else dtype
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(out_dtype)


class RMSNorm(nn.Module):
  """``y = x·rsqrt(mean(x²)+eps)·w`` over the last axis, fp32 math (TE RMSNorm), output ``dtype``."""

  features: int
  names: Names
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), self.names),
                       (self.features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class AdaLNModulation(nn.Module):
  """AdaLN-LoRA branch: ``up(down(SiLU(t_emb)))`` in fp32 (dit_spec §4.6, §8 island (b)).

  Returns the modulation *before* the shared ``adaln_lora`` addend is added (the caller adds it),
  shape ``[..., n_chunks·D]``.
  """

  model_channels: int
  lora_dim: int
  n_chunks: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t_emb: jnp.ndarray) -> jnp.ndarray:
    h = nn.silu(t_emb.astype(jnp.float32))
    h = dense(self.lora_dim, (R.EMBED, R.ADALN), dtype=jnp.float32, param_dtype=self.param_dtype,
              name="lora_down")(h)
    return dense(self.n_chunks * self.model_channels, (R.ADALN, R.EMBED), dtype=jnp.float32,
                 param_dtype=self.param_dtype, name="lora_up")(h)


def modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
  """``LayerNorm(x)·(1+scale) + shift`` in x's dtype; shift/scale broadcast over the tokens.

  ``shift``/``scale`` are per frame (``[B, Tt, 1, 1, D]`` against ``x [B, T', H', W', D]``); their
  gradients, sums over the tokens, accumulate in float32 (``broadcast_fp32_grad``).
  """
  ln = layer_norm(x)
  return ln * broadcast_fp32_grad(1 + scale, ln.shape) + broadcast_fp32_grad(shift, ln.shape)


def gated_residual(x: jnp.ndarray, gate: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
  """``x + gate·y`` with a per-frame gate broadcast over the tokens (float32-accumulated gradient)."""
  return x + broadcast_fp32_grad(gate, y.shape) * y
