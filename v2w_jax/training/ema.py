"""Power EMA of the parameters (Karras et al., EDM2), as the reference model's ``net_ema`` (spec §9).

γ is the largest real root of x³ + 7x² + (16 − s⁻²)x + (12 − s⁻²) for s = ``ema.rate``
(s = 0.1 → γ = 6.937203937601809), solved once with numpy. The decay for update k is
β(k) = (1 − 1/(k+1))^(γ+1) for k >= 1 and β(0) = 0, so the first update copies the network; k is the
optimizer step *before* its increment plus ``ema.iteration_shift``. The EMA copy is kept in float32
whatever the parameter dtype: ema ← β·ema + (1 − β)·params.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def power_ema_gamma(rate: float) -> float:
  """γ for a relative EMA width ``rate`` (largest real root of the EDM2 cubic)."""
  if not 0.0 < rate < 1.0:
    raise ValueError(f"ema.rate must be in (0, 1), got {rate}")
  s = float(rate)
  roots = np.roots([1.0, 7.0, 16.0 - s**-2, 12.0 - s**-2])
  return float(roots.real.max())


def power_ema_beta_np(k, gamma: float) -> np.ndarray:
  """β(k) in float64 (host side; k may be an array)."""
  k = np.asarray(k, np.float64)
  safe = np.maximum(k, 1.0)
  return np.where(k < 1, 0.0, (1.0 - 1.0 / (safe + 1.0)) ** (gamma + 1.0))


def power_ema_beta(k: jax.Array, gamma: float) -> jax.Array:
  """β(k) as a traced float32 scalar: exp((γ+1)·log1p(−1/(k+1))), 0 for k < 1."""
  kf = jnp.asarray(k).astype(jnp.float32)
  safe = jnp.maximum(kf, 1.0)
  beta = jnp.exp(jnp.float32(gamma + 1.0) * jnp.log1p(-1.0 / (safe + 1.0)))
  return jnp.where(kf < 1.0, jnp.float32(0.0), beta)


def ema_update(ema: Any, params: Any, beta: jax.Array) -> Any:
  """ema ← β·ema + (1 − β)·params, in float32 (the reference's mul_ then add_(alpha=1−β))."""
  beta = jnp.asarray(beta, jnp.float32)
  return jax.tree.map(lambda e, p: e * beta + p.astype(jnp.float32) * (1.0 - beta), ema, params)


def init_ema(params: Any) -> Any:
  """A float32 copy of the parameters (overwritten by the k = 0 update anyway)."""
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
