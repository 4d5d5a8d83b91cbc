"""Power EMA of the parameters (Karras et al., EDM2), as the reference model's ``net_ema`` (spec §9).

γ is the largest real root of x³ + 7x² + (16 − s⁻²)x + (12 − s⁻²) for s = ``ema.rate``
(s = 0.1 → γ = 6.937203937601809), solved once with numpy. The decay for update k is
β(k) = (1 − 1/(k+1))^(γ+1) for k >= 1 and β(0) = 0, so the first update copies the network; k is the
optimizer step *before* its increment plus ``ema.iteration_shift``. The EMA copy is kept in float32
whatever the parameter dtype: ema ← β·ema + (1 − β)·params.

Memory options (``config.ema``), the default keeping the reference's per-step update on the device:

* ``offload=True``: the EMA (4 bytes per parameter, 7.7 GiB for the 2B) lives in pinned host memory;
  each update brings it to the device, updates it and writes it back (:func:`ema_update` with
  ``on_host``). Same numbers, less device memory, two host transfers per update.
* ``every_n_steps=N``: update only after every N-th optimizer step, with the product of the N skipped
  decays (:func:`power_ema_beta_window`): exact for the first update, otherwise it treats the
  parameters as constant over the window (an approximation, off by default).
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


def power_ema_beta_window(k_last: jax.Array, n: int, gamma: float) -> jax.Array:
  """The decay of n consecutive updates k_last−n+1 … k_last made at once: Π β(k) = (a/(k_last+1))^(γ+1)
  with a = k_last−n+1 (0 when the window includes k = 0). n = 1 is :func:`power_ema_beta` itself."""
  if n == 1:
    return power_ema_beta(k_last, gamma)
  last = jnp.asarray(k_last).astype(jnp.float32)
  first = last - jnp.float32(n - 1)
  beta = jnp.exp(jnp.float32(gamma + 1.0) * (jnp.log(jnp.maximum(first, 1.0)) - jnp.log(last + 1.0)))
  return jnp.where(first < 1.0, jnp.float32(0.0), beta)


def ema_update(ema: Any, params: Any, beta: jax.Array, *, on_host: bool = False) -> Any:
  """ema ← β·ema + (1 − β)·params, in float32 (the reference's mul_ then add_(alpha=1−β)).

  ``on_host`` (inside ``jax.jit``): ``ema`` lives in pinned host memory; it is moved to the device for
  the update and the result moved back, so only the update itself holds it on the device.
  """
  beta = jnp.asarray(beta, jnp.float32)
  if on_host:
    ema = jax.device_put(ema, jax.memory.Space.Device)
  new = jax.tree.map(lambda e, p: e * beta + p.astype(jnp.float32) * (1.0 - beta), ema, params)
  return jax.device_put(new, jax.memory.Space.Host) if on_host else new


def to_device(tree: Any) -> Any:
  """An offloaded EMA copied to device memory (same sharding) for evaluation or sampling; arrays
  already on the device are returned as they are."""
  def one(a):
    kind = getattr(a.sharding, "memory_kind", None)
    return a if kind in (None, "device") else jax.device_put(a, a.sharding.with_memory_kind("device"))

  return None if tree is None else jax.tree.map(one, tree)


OFFLOAD_UPDATES = ("in_step", "separate")


def offload_memory_kind(ema_config: Any, device: Any = None) -> str | None:
  """'pinned_host' when ``ema.offload`` is set (checked against the device), else None (device memory)."""
  if not bool(ema_config.get("offload", False)):
    return None
  device = jax.devices()[0] if device is None else device
  kinds = {m.kind for m in device.addressable_memories()}
  if "pinned_host" not in kinds:
    raise ValueError(f"ema.offload=True: {device.device_kind} has no pinned host memory "
                     f"(memory kinds {sorted(kinds)}); set ema.offload=False")
  return "pinned_host"


def schedule(ema_config: Any) -> tuple[int, bool]:
  """(every_n_steps, separate): how often the EMA is updated, and whether by a program of its own
  (``ema.offload_update='separate'``) rather than inside the train step. Validates the fields."""
  every = int(ema_config.get("every_n_steps", 1))
  if every < 1:
    raise ValueError(f"ema.every_n_steps must be >= 1, got {every}")
  mode = str(ema_config.get("offload_update", "in_step"))
  if mode not in OFFLOAD_UPDATES:
    raise ValueError(f"ema.offload_update: unknown {mode!r} (expected one of {OFFLOAD_UPDATES})")
  return every, mode == "separate"


def init_ema(params: Any) -> Any:
  """A float32 copy of the parameters (overwritten by the k = 0 update anyway)."""
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
