"""Timestep sinusoid and 3-D rotary position embedding of the DiT (dit_spec §4.4, §4.5).

Everything here is float32 math with no parameters. The RoPE angle table is a function of *global*
token positions, so a context-parallel shard can build the rows of its own slice of the sequence
(pass that shard's positions).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np


def timestep_sinusoid(timesteps: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """``[cos(t·f), sin(t·f)]`` with f_i = exp(-ln(max_period)·i/(dim/2)); shape ``t.shape + (dim,)``.

  Cosine first (flip_sin_to_cos), no frequency shift, fp32. ``timesteps`` are already scaled.
  """
  half = dim // 2
  exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / np.float32(half)
  freqs = jnp.exp(jnp.asarray(exponent, jnp.float32))
  args = timesteps.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def rope_exponents(dim: int, bf16: bool) -> np.ndarray:
  """Exponents e_j = 2j/dim (j < dim/2) as float32, optionally rounded to bfloat16.

  The reference keeps them in buffers that the bf16 training/inference net holds in bf16, so the
  real model sees the rounded values (dit_spec §4.5); ``bf16=False`` gives the exact ones.
  """
  e = np.arange(0, dim, 2, dtype=np.int64)[: dim // 2].astype(np.float32) / np.float32(dim)
  if bf16:
    e = e.astype(ml_dtypes.bfloat16).astype(np.float32)
  return e


def rope_frequencies(dim: int, extrapolation_ratio: float, bf16_exponents: bool) -> np.ndarray:
  """Per-axis frequencies theta^-e_j with NTK-scaled theta = 1e4·ratio^(dim/(dim-2)) (float32)."""
  theta = 10000.0 * extrapolation_ratio ** (dim / (dim - 2))
  e = rope_exponents(dim, bf16_exponents)
  return (np.float32(1.0) / np.power(np.float32(theta), e)).astype(np.float32)


def rope_angles(
    t_positions: jnp.ndarray,
    h_positions: jnp.ndarray,
    w_positions: jnp.ndarray,
    *,
    dims: tuple[int, int, int],
    ratios: tuple[float, float, float],
    bf16_exponents: bool,
) -> jnp.ndarray:
  """RoPE angle table ``[len_t·len_h·len_w, head_dim]`` for the grid of the given positions.

  Rows are tokens in (t, h, w) order; columns are ``[a, a]`` with ``a = [t·f_t, h·f_h, w·f_w]``.
  Positions are global integer patch indices (e.g. ``jnp.arange(t0, t1)`` for a shard of frames).

  Args:
    t_positions, h_positions, w_positions: 1-D integer (or float) positions along each axis.
    dims: head-dim split (t, h, w), see ``DiTConfig.rope_dims``.
    ratios: extrapolation ratios (t, h, w).
    bf16_exponents: round the frequency exponents to bf16 like the real model.
  """
  axes = []
  for pos, dim, ratio in zip((t_positions, h_positions, w_positions), dims, ratios):
    freqs = jnp.asarray(rope_frequencies(dim, ratio, bf16_exponents))
    axes.append(jnp.asarray(pos, jnp.float32)[:, None] * freqs[None, :])
  ang_t, ang_h, ang_w = axes
  nt, nh, nw = ang_t.shape[0], ang_h.shape[0], ang_w.shape[0]
  half = jnp.concatenate(
      [
          jnp.broadcast_to(ang_t[:, None, None, :], (nt, nh, nw, ang_t.shape[1])),
          jnp.broadcast_to(ang_h[None, :, None, :], (nt, nh, nw, ang_h.shape[1])),
          jnp.broadcast_to(ang_w[None, None, :, :], (nt, nh, nw, ang_w.shape[1])),
      ],
      axis=-1,
  ).reshape(nt * nh * nw, -1)
  return jnp.concatenate([half, half], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotate-half (GPT-NeoX, non-interleaved) RoPE in float32.

  Args:
    x: ``[B, L, heads, head_dim]``.
    cos, sin: ``[L, head_dim]`` of the angle table.

  Returns:
    float32 ``[B, L, heads, head_dim]``.
  """
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return x * cos[None, :, None, :] + rotated * sin[None, :, None, :]
