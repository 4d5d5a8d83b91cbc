"""EDM training objective (the reference ``Video2WorldModel``; training_spec §2.2, configs/nemo_edm.py).

Not what the nemo recipe runs (that is rectified flow) but the objective the design document
describes. Pieces:

* preconditioning :func:`edm_scaling` (c_skip, c_out, c_in, c_noise with σ_data) and
  :func:`rf_scaling` (the "rectified_flow" scaling: t = σ/(1+σ), (1−t, −t, 1−t, t));
* loss weights :func:`loss_weight` (EDM: (σ²+σd²)/(σσd)²; RF scaling: (1+σ)²/σ²);
* σ sampling :func:`sample_sigma`: log σ ~ N(p_mean, p_std), × √T for video batches
  (``adjust_video_noise``), then a high-σ strategy for video batches
  (``none | uniform80_2000 | LOGUNIFORM200_100000 | shift24 | balanced_two_heads_v1 | hardcoded_20steps``);
* :func:`edm_loss`: x_σ = x0 + σ ε, net input c_in x_σ with conditional frames replaced by gt/σ_data and
  their c_noise by c_noise(σ_conditional), x̂0 = c_skip x_σ + c_out F with conditional frames replaced
  by gt, loss = loss_scale × reduce(w(σ) (x0 − x̂0)²).

The EDM model's ``encode`` multiplies the normalised VAE latents by σ_data (0.5 in the class
defaults); :func:`edm_loss` takes those scaled latents as x0 (the objective wrapper does the scaling).
With RF scaling and σ_data = 1, loss/loss_scale equals the rectified-flow velocity MSE exactly.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from v2w_jax.diffusion.rectified_flow import reduce_loss
from v2w_jax.diffusion.timesteps import karras_sigmas

SCALINGS = ("edm", "rectified_flow")
HIGH_SIGMA_STRATEGIES = (
    "none",
    "uniform80_2000",
    "LOGUNIFORM200_100000",
    "shift24",
    "balanced_two_heads_v1",
    "hardcoded_20steps",
)
LOG_200 = math.log(200.0)
LOG_100000 = math.log(100000.0)


def edm_scaling(sigma: jax.Array, sigma_data: float = 0.5):
  """EDM preconditioning (c_skip, c_out, c_in, c_noise) = (σd²/(σ²+σd²), σσd/√(σ²+σd²), 1/√(σ²+σd²), ¼ ln σ)."""
  sd2 = sigma_data**2
  denom = sigma**2 + sd2
  c_skip = sd2 / denom
  c_out = sigma * sigma_data / jnp.sqrt(denom)
  c_in = 1.0 / jnp.sqrt(denom)
  c_noise = 0.25 * jnp.log(sigma)
  return c_skip, c_out, c_in, c_noise


def rf_scaling(sigma: jax.Array, t_scaling_factor: float = 1.0):
  """Rectified-flow preconditioning: t = σ/(1+σ); (c_skip, c_out, c_in, c_noise) = (1−t, −t, 1−t, t·factor)."""
  t = sigma / (1.0 + sigma)
  return 1.0 - t, -t, 1.0 - t, t * t_scaling_factor


def scaling_fn(name: str, sigma_data: float) -> Callable:
  if name == "edm":
    return lambda s: edm_scaling(s, sigma_data)
  if name == "rectified_flow":
    return rf_scaling
  raise ValueError(f"objective.edm.scaling: unknown {name!r} (expected one of {SCALINGS})")


def loss_weight(sigma: jax.Array, scaling: str, sigma_data: float = 0.5) -> jax.Array:
  """Per-σ loss weight: EDM (σ²+σd²)/(σσd)², RF scaling (1+σ)²/σ²."""
  if scaling == "edm":
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
  if scaling == "rectified_flow":
    return (1.0 + sigma) ** 2 / sigma**2
  raise ValueError(f"objective.edm.scaling: unknown {scaling!r} (expected one of {SCALINGS})")


def hardcoded_20steps_sigmas(sigma_min: float, sigma_max: float) -> np.ndarray:
  """{1e5} ∪ Karras(sigma_max → sigma_min, 20 steps, ρ 7): 22 candidate σ values (float64)."""
  return np.concatenate([[100000.0], karras_sigmas(sigma_max, sigma_min, 20, 7.0)])


def sample_sigma(
    key: jax.Array,
    batch_size: int,
    *,
    p_mean: float = 0.0,
    p_std: float = 1.0,
    is_video: bool = True,
    video_noise_multiplier: float = 1.0,
    high_sigma_strategy: str = "none",
    high_sigma_ratio: float = 0.05,
    low_sigma_ratio: float = 0.05,
    sigma_min: float = 0.0002,
    sigma_max: float = 80.0,
) -> jax.Array:
  """Training σ per sample [B] float32 (all frames share it). See the module docstring.

  ``video_noise_multiplier`` is √T_latent when ``adjust_video_noise`` (1 otherwise); it and the high-σ
  strategy apply to video batches only. No clipping to [sigma_min, sigma_max] (as the reference).
  """
  if high_sigma_strategy not in HIGH_SIGMA_STRATEGIES:
    raise ValueError(f"objective.edm.high_sigma_strategy: unknown {high_sigma_strategy!r} "
                     f"(expected one of {HIGH_SIGMA_STRATEGIES})")
  keys = jax.random.split(key, 6)
  shape = (batch_size,)
  sigma = jnp.exp(p_mean + p_std * jax.random.normal(keys[0], shape, jnp.float32))
  if not is_video:
    return sigma
  sigma = sigma * jnp.float32(video_noise_multiplier)

  def replace(sigma, k_mask, k_val, ratio, new_fn):
    mask = jax.random.uniform(k_mask, shape) < ratio
    return jnp.where(mask, new_fn(jax.random.uniform(k_val, shape, jnp.float32)), sigma)

  uniform80_2000 = lambda u: u * 1920.0 + 80.0
  loguniform = lambda u: jnp.exp(u * (LOG_100000 - LOG_200) + LOG_200)
  s = high_sigma_strategy
  if s == "uniform80_2000":
    sigma = replace(sigma, keys[1], keys[2], high_sigma_ratio, uniform80_2000)
  elif s == "LOGUNIFORM200_100000":
    sigma = replace(sigma, keys[1], keys[2], high_sigma_ratio, loguniform)
  elif s == "shift24":
    # t = 24u/(24u + 1 − u), σ = t/(1 − t) = 24u/(1 − u): the base draw is discarded (as the reference).
    u = jax.random.uniform(keys[3], shape, jnp.float32)
    sigma = 24.0 * u / (1.0 - u)
    sigma = replace(sigma, keys[1], keys[2], high_sigma_ratio, uniform80_2000)
  elif s == "balanced_two_heads_v1":
    sigma = replace(sigma, keys[1], keys[2], high_sigma_ratio, loguniform)
    sigma = replace(sigma, keys[4], keys[5], low_sigma_ratio, lambda u: u * 2.0 + 0.00001)
  elif s == "hardcoded_20steps":
    table = jnp.asarray(hardcoded_20steps_sigmas(sigma_min, sigma_max), jnp.float32)
    sigma = table[jax.random.randint(keys[3], shape, 0, table.shape[0])]
  return sigma


def precondition(
    net_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_sigma: jax.Array,
    gt: jax.Array,
    sigma: jax.Array,
    mask: jax.Array,
    *,
    sigma_data: float,
    scaling: str,
    sigma_conditional: float,
    net_dtype=jnp.float32,
) -> jax.Array:
  """The reference ``denoise``: x̂0 = c_skip·x_σ + c_out·F(net_in, c_noise) (training_spec §2.2 steps 3-4).

  Noisy frames enter the net as c_in·x_σ with c_noise(σ); conditional frames (``mask`` [B|1,1,T,1,1] > 0)
  as the clean gt/σ_data with c_noise(σ_conditional). ``net_fn(net_in, c_noise_B_T) -> F``; ``sigma``
  broadcasts as [B,1,1,1,1]. Shared by the training loss and the EDM sampler's denoiser.
  """
  scale = scaling_fn(scaling, sigma_data)
  b, t = x_sigma.shape[0], x_sigma.shape[2]
  c_skip, c_out, c_in, c_noise = scale(sigma)
  cond = mask > 0
  net_in = jnp.where(cond, gt / sigma_data, c_in * x_sigma).astype(net_dtype)
  c_noise_cond = scale(jnp.full((1,), sigma_conditional, jnp.float32))[3]
  c_noise_B_T = jnp.where(jnp.broadcast_to(cond[:, 0, :, 0, 0], (b, t)), c_noise_cond,
                          jnp.broadcast_to(c_noise.reshape(b, 1), (b, t)))
  net_out = net_fn(net_in, c_noise_B_T.astype(jnp.float32)).astype(jnp.float32)
  return c_skip * x_sigma + c_out * net_out


def edm_loss(
    net_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x0: jax.Array,
    eps: jax.Array,
    sigma_B: jax.Array,
    frame_mask_B_T: jax.Array,
    *,
    sigma_data: float = 0.5,
    scaling: str = "edm",
    sigma_conditional: float = 1e-4,
    loss_scale: float = 10.0,
    net_dtype=jnp.bfloat16,
    denoise_replace_gt_frames: bool = True,
    loss_reduce: str = "mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """EDM training loss for one batch (training_spec §2.2 steps 2-5).

  Args:
    net_fn: ``net_fn(x_in_B_C_T_H_W, c_noise_B_T) -> F`` (the DiT with everything else bound).
    x0: clean latents [B,C,T,H,W] float32, already multiplied by σ_data.
    eps: noise, same shape.
    sigma_B: per-sample σ [B].
    frame_mask_B_T: 1 on conditional latent frames.

  Returns:
    (scalar loss, aux) with aux['sq_err_per_sample'] [B] (unweighted mean (x0 − x̂0)² per sample).
  """
  b = x0.shape[0]
  sigma = jnp.asarray(sigma_B, jnp.float32).reshape(b, 1, 1, 1, 1)
  mask = frame_mask_B_T.astype(jnp.float32)[:, None, :, None, None]
  x_sigma = x0 + sigma * eps
  gt = x0.astype(net_dtype).astype(jnp.float32)  # the reference keeps gt_frames in the model precision
  x0_pred = precondition(net_fn, x_sigma, gt, sigma, mask, sigma_data=sigma_data, scaling=scaling,
                         sigma_conditional=sigma_conditional, net_dtype=net_dtype)
  if denoise_replace_gt_frames:
    x0_pred = jnp.where(mask > 0, gt, x0_pred)
  sq_err = jnp.square(x0 - x0_pred)
  weighted = loss_weight(sigma, scaling, sigma_data) * sq_err
  loss = loss_scale * reduce_loss(weighted, mask, loss_reduce)
  return loss, {"sq_err_per_sample": jnp.mean(sq_err, axis=tuple(range(1, sq_err.ndim)))}
