"""One interface over the training objectives, chosen by ``config.objective.name``.

``make_objective(config)`` returns an :class:`Objective` with:

* ``sample_noise_level(key, batch_size, num_latent_frames) -> NoiseLevel`` — the training time / σ;
* ``noise_level_at(timesteps_B, num_latent_frames) -> NoiseLevel`` — a fixed level for validation,
  given as rectified-flow timesteps τ in [0, 1000] (σ_RF = τ/1000; EDM uses the equivalent
  σ_EDM = σ_RF/(1 − σ_RF), the logit-normal correspondence of training_spec §2.1);
* ``loss(net_fn, latents, eps, level, cond) -> (loss, aux)`` — ``net_fn(x_in, timesteps) -> output``
  is the network with text, masks and flags already bound (see ``training/step.py``).

``latents`` are the normalised VAE latents in both cases; the EDM objective multiplies them by σ_data
itself (the reference EDM model's ``encode`` does).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from v2w_jax.diffusion import edm, rectified_flow
from v2w_jax.diffusion.conditioning import VideoCondition

NetFn = Callable[[jax.Array, jax.Array], jax.Array]

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


class NoiseLevel(NamedTuple):
  """Per-sample noise level: ``sigma`` [B] (σ_RF in [0, 1] or σ_EDM) and ``timestep`` [B] (τ for RF,
  σ for EDM), both float32."""

  sigma: jax.Array
  timestep: jax.Array


def _dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"config.model.dtype: unknown {name!r} (expected one of {sorted(_DTYPES)})")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RectifiedFlowObjective:
  """Velocity prediction on the shift-5 logit-normal table (training_spec §2.1)."""

  shift: float = 5.0
  num_train_timesteps: int = 1000
  train_time_distribution: str = "logitnormal"
  use_high_sigma_strategy: bool = False
  high_sigma_ratio: float = 0.05
  high_sigma_timesteps_min: float = 980.0
  high_sigma_timesteps_max: float = 1000.0
  conditional_frame_timestep: float = -1.0
  loss_reduce: str = "mean"
  net_dtype: Any = jnp.bfloat16
  name: str = "rectified_flow"

  def __post_init__(self):
    if self.loss_reduce not in rectified_flow.LOSS_REDUCTIONS:
      raise ValueError(f"objective.loss_reduce: unknown {self.loss_reduce!r} "
                       f"(expected one of {rectified_flow.LOSS_REDUCTIONS})")
    tau, sig = rectified_flow.train_time_table(self.shift, self.num_train_timesteps)
    object.__setattr__(self, "_tau", tau)
    object.__setattr__(self, "_sigma", sig)
    hs = None
    if self.use_high_sigma_strategy:
      hs = rectified_flow.high_sigma_candidates(tau, self.high_sigma_timesteps_min, self.high_sigma_timesteps_max)
    object.__setattr__(self, "_high_sigma", hs)

  @property
  def table(self) -> tuple[np.ndarray, np.ndarray]:
    return self._tau, self._sigma

  def sample_noise_level(self, key: jax.Array, batch_size: int, num_latent_frames: int) -> NoiseLevel:
    del num_latent_frames
    idx = rectified_flow.sample_time_index(
        key,
        batch_size,
        num_train_timesteps=self.num_train_timesteps,
        distribution=self.train_time_distribution,
        high_sigma_indices=self._high_sigma,
        high_sigma_ratio=self.high_sigma_ratio if self.use_high_sigma_strategy else 0.0,
    )
    return NoiseLevel(sigma=jnp.asarray(self._sigma)[idx], timestep=jnp.asarray(self._tau)[idx])

  def noise_level_at(self, timesteps_B: jax.Array, num_latent_frames: int) -> NoiseLevel:
    del num_latent_frames
    tau = jnp.asarray(timesteps_B, jnp.float32)
    return NoiseLevel(sigma=tau / jnp.float32(self.num_train_timesteps), timestep=tau)

  def loss(self, net_fn: NetFn, latents, eps, level: NoiseLevel, cond: VideoCondition):
    return rectified_flow.rf_loss(
        net_fn,
        latents,
        eps,
        level.timestep,
        level.sigma,
        cond.frame_mask_B_T,
        net_dtype=self.net_dtype,
        conditional_frame_timestep=self.conditional_frame_timestep,
        loss_reduce=self.loss_reduce,
    )


@dataclasses.dataclass(frozen=True)
class EDMObjective:
  """EDM x0-prediction with preconditioning (training_spec §2.2)."""

  p_mean: float = 0.0
  p_std: float = 1.0
  sigma_max: float = 80.0
  sigma_min: float = 0.0002
  sigma_data: float = 0.5
  scaling: str = "edm"
  loss_scale: float = 10.0
  adjust_video_noise: bool = True
  state_t: int = 0  # > 0: fixed √state_t video multiplier (reference: 24); 0: √T of the batch
  high_sigma_strategy: str = "uniform80_2000"
  high_sigma_ratio: float = 0.05
  low_sigma_ratio: float = 0.05
  sigma_conditional: float = 1e-4
  loss_reduce: str = "mean"
  net_dtype: Any = jnp.bfloat16
  name: str = "edm"

  def __post_init__(self):
    if self.scaling not in edm.SCALINGS:
      raise ValueError(f"objective.edm.scaling: unknown {self.scaling!r} (expected one of {edm.SCALINGS})")
    if self.high_sigma_strategy not in edm.HIGH_SIGMA_STRATEGIES:
      raise ValueError(f"objective.edm.high_sigma_strategy: unknown {self.high_sigma_strategy!r} "
                       f"(expected one of {edm.HIGH_SIGMA_STRATEGIES})")
    if self.loss_reduce not in rectified_flow.LOSS_REDUCTIONS:
      raise ValueError(f"objective.loss_reduce: unknown {self.loss_reduce!r} "
                       f"(expected one of {rectified_flow.LOSS_REDUCTIONS})")

  def video_noise_multiplier(self, num_latent_frames: int) -> float:
    if not self.adjust_video_noise:
      return 1.0
    return math.sqrt(self.state_t if self.state_t > 0 else num_latent_frames)

  def sample_noise_level(self, key: jax.Array, batch_size: int, num_latent_frames: int) -> NoiseLevel:
    sigma = edm.sample_sigma(
        key,
        batch_size,
        p_mean=self.p_mean,
        p_std=self.p_std,
        is_video=num_latent_frames > 1,
        video_noise_multiplier=self.video_noise_multiplier(num_latent_frames),
        high_sigma_strategy=self.high_sigma_strategy,
        high_sigma_ratio=self.high_sigma_ratio,
        low_sigma_ratio=self.low_sigma_ratio,
        sigma_min=self.sigma_min,
        sigma_max=self.sigma_max,
    )
    return NoiseLevel(sigma=sigma, timestep=sigma)

  def noise_level_at(self, timesteps_B: jax.Array, num_latent_frames: int) -> NoiseLevel:
    del num_latent_frames
    t = jnp.asarray(timesteps_B, jnp.float32) / 1000.0
    sigma = t / (1.0 - t)
    return NoiseLevel(sigma=sigma, timestep=sigma)

  def loss(self, net_fn: NetFn, latents, eps, level: NoiseLevel, cond: VideoCondition):
    return edm.edm_loss(
        net_fn,
        latents * self.sigma_data,
        eps,
        level.sigma,
        cond.frame_mask_B_T,
        sigma_data=self.sigma_data,
        scaling=self.scaling,
        sigma_conditional=self.sigma_conditional,
        loss_scale=self.loss_scale,
        net_dtype=self.net_dtype,
        loss_reduce=self.loss_reduce,
    )


Objective = RectifiedFlowObjective | EDMObjective


def make_objective(config) -> Objective:
  """Builds the objective named by ``config.objective.name`` from ``config.objective.*``,
  ``config.conditioning.conditional_frame_timestep`` and ``config.model.dtype``."""
  obj = config.objective
  net_dtype = _dtype(str(config.model.get("dtype", "bfloat16")))
  reduce = str(obj.get("loss_reduce", "mean"))
  if obj.name == "rectified_flow":
    rf = obj.rectified_flow
    return RectifiedFlowObjective(
        shift=float(rf.shift),
        num_train_timesteps=int(rf.num_train_timesteps),
        train_time_distribution=str(rf.train_time_distribution),
        use_high_sigma_strategy=bool(rf.use_high_sigma_strategy),
        high_sigma_ratio=float(rf.high_sigma_ratio),
        high_sigma_timesteps_min=float(rf.high_sigma_timesteps_min),
        high_sigma_timesteps_max=float(rf.high_sigma_timesteps_max),
        conditional_frame_timestep=float(config.conditioning.get("conditional_frame_timestep", -1.0)),
        loss_reduce=reduce,
        net_dtype=net_dtype,
    )
  if obj.name == "edm":
    e = obj.edm
    ts = float(config.model.get("timestep_scale", 1.0))
    if ts != 1.0:
      logging.warning(
          "objective 'edm' feeds c_noise as timesteps but config.model.timestep_scale = %s; the reference "
          "EDM nets use timestep_scale 1.0", ts)
    return EDMObjective(
        p_mean=float(e.p_mean),
        p_std=float(e.p_std),
        sigma_max=float(e.sigma_max),
        sigma_min=float(e.sigma_min),
        sigma_data=float(e.sigma_data),
        scaling=str(e.scaling),
        loss_scale=float(e.loss_scale),
        adjust_video_noise=bool(e.adjust_video_noise),
        state_t=int(e.get("state_t", 0)),
        high_sigma_strategy=str(e.high_sigma_strategy),
        high_sigma_ratio=float(e.high_sigma_ratio),
        low_sigma_ratio=float(e.get("low_sigma_ratio", 0.05)),
        sigma_conditional=float(e.sigma_conditional),
        loss_reduce=reduce,
        net_dtype=net_dtype,
    )
  raise ValueError(f"config.objective.name: unknown {obj.name!r} (expected 'rectified_flow' or 'edm')")
