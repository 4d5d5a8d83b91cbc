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

from v2w_jax.parallel import rules as R

Names = tuple[str | None, ...]
_KERNEL_INIT = nn.initializers.lecun_normal()


def dense(features: int, names: Names, *, dtype: Any, param_dtype: Any, use_bias: bool = False,
          name: str | None = None, kernel_init: Any = _KERNEL_INIT) -> nn.Dense:
  """``nn.Dense`` with a logically partitioned kernel ``[in, out]`` (and bias ``[out]``)."""
  return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]),
      name=name,
  )


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
  """``LayerNorm(x)·(1+scale) + shift`` in x's dtype (shift/scale already broadcastable)."""
  return layer_norm(x) * (1 + scale) + shift
