"""Rectified-flow training objective: the one the nemo recipe runs (training_spec §2.1).

Pieces, each a small pure function:

* :func:`train_time_table` — the reference's 1000-entry (timestep, sigma) table, built in float32 op
  by op exactly like diffusers' ``FlowMatchEulerDiscreteScheduler(shift=5)`` (bit-identical).
* :func:`time_index_from_u` / :func:`sample_time_index` — u = sigmoid(z), z ~ N(0, 1) (logit-normal),
  index = trunc(float32(u · 1000)), clamped to 999 (the reference would index out of range at u = 1),
  plus the optional high-sigma replacement (uniform over the table entries with τ in [min, max]).
* :func:`interpolate` — x_t = σ ε + (1 − σ) x0 and the velocity target v = ε − x0.
* :func:`rf_loss` — frame replacement on the input and on the prediction, the network call, and the
  mean squared velocity error.

Loss reductions (``objective.loss_reduce``):

* ``"mean"`` (reference): the mean over *all* B·C·T·H·W elements. Conditional frames contribute
  (ε − bf16(x0) − (ε − x0))² ≈ 0 and no gradient, but still count in the denominator, so with N of T
  latent frames conditional the gradient is N/T smaller than a masked mean would give.
* ``"masked_mean"``: per sample, the mean over its non-conditional frames only; then the batch mean.
  A sample whose every frame is conditional contributes 0.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

LOSS_REDUCTIONS = ("mean", "masked_mean")


def train_time_table(shift: float = 5.0, num_train_timesteps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
  """The reference training table (timesteps τ_i, sigmas σ_i), i = 0..N-1, float32.

  Built op by op in float32 as diffusers 0.33.1 does: t_i = N − i, s_i = t_i / N,
  σ_i = S·s_i / (1 + (S − 1)·s_i), τ_i = σ_i · N. Index 0 is τ = N (pure noise).
  """
  if num_train_timesteps < 1:
    raise ValueError(f"train_time_table: num_train_timesteps must be >= 1, got {num_train_timesteps}")
  n = np.float32(num_train_timesteps)
  t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
  s = t / n
  shift32 = np.float32(shift)
  sigmas = (shift32 * s) / (np.float32(1.0) + (shift32 - np.float32(1.0)) * s)
  timesteps = sigmas * n
  return timesteps.astype(np.float32), sigmas.astype(np.float32)


def high_sigma_candidates(timesteps: np.ndarray, tau_min: float, tau_max: float) -> np.ndarray:
  """Indices of the table entries with tau_min <= τ <= tau_max (reference: 93 entries for [980, 1000])."""
  idx = np.nonzero((timesteps >= tau_min) & (timesteps <= tau_max))[0]
  if idx.size == 0:
    raise ValueError(f"high-sigma range [{tau_min}, {tau_max}] contains no table timestep")
  return idx.astype(np.int32)


def time_index_from_u(u: jax.Array, num_train_timesteps: int = 1000) -> jax.Array:
  """u in [0, 1] -> table index trunc(float32(u · N)), clamped to N − 1 (reference quirk 9 fixed)."""
  u = jnp.asarray(u, jnp.float32)
  idx = jnp.floor(u * jnp.float32(num_train_timesteps)).astype(jnp.int32)
  return jnp.clip(idx, 0, num_train_timesteps - 1)


def sample_time_index(
    key: jax.Array,
    batch_size: int,
    *,
    num_train_timesteps: int = 1000,
    distribution: str = "logitnormal",
    high_sigma_indices: np.ndarray | None = None,
    high_sigma_ratio: float = 0.0,
) -> jax.Array:
  """Per-sample table indices [B] int32 (all frames of a sample share one time).

  ``distribution``: ``"logitnormal"`` (u = sigmoid(z), z ~ N(0, 1); reference) or ``"uniform"``
  (u ~ U[0, 1)). With ``high_sigma_indices`` given and ratio > 0, each sample independently with
  probability ``high_sigma_ratio`` takes a uniformly chosen index from that set instead.
  """
  k_z, k_mask, k_pick = jax.random.split(key, 3)
  if distribution == "logitnormal":
    u = jax.nn.sigmoid(jax.random.normal(k_z, (batch_size,), jnp.float32))
  elif distribution == "uniform":
    u = jax.random.uniform(k_z, (batch_size,), jnp.float32)
  else:
    raise ValueError(f"objective.rectified_flow.train_time_distribution: unknown {distribution!r} "
                     "(expected 'logitnormal' or 'uniform')")
  idx = time_index_from_u(u, num_train_timesteps)
  if high_sigma_indices is not None and high_sigma_ratio > 0.0:
    cand = jnp.asarray(high_sigma_indices, jnp.int32)
    use_high = jax.random.uniform(k_mask, (batch_size,)) < high_sigma_ratio
    pick = cand[jax.random.randint(k_pick, (batch_size,), 0, cand.shape[0])]
    idx = jnp.where(use_high, pick, idx)
  return idx


def interpolate(x0: jax.Array, eps: jax.Array, sigma_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x_t = σ ε + (1 − σ) x0 and target v = ε − x0 (float32; σ per sample, broadcast over C,T,H,W)."""
  sigma = jnp.asarray(sigma_B, jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
  x_t = sigma * eps + (1.0 - sigma) * x0
  return x_t, eps - x0


def reduce_loss(sq_err: jax.Array, frame_mask_B_1_T_1_1: jax.Array, reduce: str) -> jax.Array:
  """Reduces per-element squared errors [B,C,T,H,W] to a scalar (see the module docstring)."""
  if reduce == "mean":
    return jnp.mean(sq_err)
  if reduce == "masked_mean":
    keep = jnp.broadcast_to(1.0 - frame_mask_B_1_T_1_1.astype(jnp.float32), sq_err.shape)
    num = jnp.sum(sq_err * keep, axis=tuple(range(1, sq_err.ndim)))
    den = jnp.sum(keep, axis=tuple(range(1, sq_err.ndim)))
    return jnp.mean(num / jnp.maximum(den, 1.0))
  raise ValueError(f"objective.loss_reduce: unknown {reduce!r} (expected one of {LOSS_REDUCTIONS})")


def rf_timesteps(
    tau_B: jax.Array, frame_mask_B_T: jax.Array, conditional_frame_timestep: float = -1.0
) -> jax.Array:
  """Timesteps handed to the net: τ as [B,1] (raw 0..1000, the DiT scales them), or [B,T] with the
  conditional frames set to ``conditional_frame_timestep`` when that is >= 0."""
  tau = jnp.asarray(tau_B, jnp.float32)[:, None]
  if conditional_frame_timestep is None or conditional_frame_timestep < 0:
    return tau
  return jnp.where(frame_mask_B_T > 0, jnp.float32(conditional_frame_timestep), tau)


def rf_loss(
    net_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    eps: jax.Array,
    tau_B: jax.Array,
    sigma_B: jax.Array,
    frame_mask_B_T: jax.Array,
    *,
    net_dtype=jnp.bfloat16,
    conditional_frame_timestep: float = -1.0,
    denoise_replace_gt_frames: bool = True,
    loss_reduce: str = "mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The rectified-flow training loss for one batch (training_spec §2.1 steps 4-7).

  Args:
    net_fn: ``net_fn(x_in_B_C_T_H_W, timesteps) -> velocity`` (the DiT with everything else bound).
    x0: clean latents [B,C,T,H,W] float32.
    eps: noise, same shape, float32.
    tau_B, sigma_B: per-sample table timestep and sigma [B] float32.
    frame_mask_B_T: 1 on conditional latent frames.
    net_dtype: dtype of the network input and of the clean conditional frames (reference: bf16).
    conditional_frame_timestep: >= 0 gives conditional frames this timestep ([B,T] timesteps).
    denoise_replace_gt_frames: replace the prediction on conditional frames by ε − gt (no gradient).
    loss_reduce: ``"mean"`` (reference) or ``"masked_mean"``.

  Returns:
    (scalar loss, aux) with aux['sq_err_per_sample'] [B] (mean over C,T,H,W).
  """
  x_t, v_target = interpolate(x0, eps, sigma_B)
  mask = frame_mask_B_T.astype(jnp.float32)[:, None, :, None, None]  # B,1,T,1,1
  gt = x0.astype(net_dtype)
  x_in = jnp.where(mask > 0, gt, x_t.astype(net_dtype))
  timesteps = rf_timesteps(tau_B, frame_mask_B_T, conditional_frame_timestep)
  v_pred = net_fn(x_in, timesteps).astype(jnp.float32)
  if denoise_replace_gt_frames:
    v_pred = jnp.where(mask > 0, eps - gt.astype(jnp.float32), v_pred)
  sq_err = jnp.square(v_pred - v_target)
  loss = reduce_loss(sq_err, mask, loss_reduce)
  return loss, {"sq_err_per_sample": jnp.mean(sq_err, axis=tuple(range(1, sq_err.ndim)))}
