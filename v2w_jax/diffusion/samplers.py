"""Video2World inference sampling: schedule + noise + conditional frames + CFG + solver, in one place.

* ``sample_rf``: rectified flow with UniPC (``unipc.py``), what the nemo run and the released checkpoints use
  (``training_spec.md`` §11); the network is the velocity predictor.
* ``sample_edm``: the EDM path with the 2ab sampler (``edm_sampler.py``) on an x0 denoiser;
  ``edm_denoiser`` builds that denoiser from the raw network with the EDM preconditioning (§2.2).
* ``RFSampler`` / ``EDMSampler`` (``make_sampler(objective, ...)`` picks one for a training objective): the
  settings of one sampling run and a call ``sampler(net_fn, noise, ...)`` on the raw network, with latents in
  the normalised VAE latent space for both (the EDM sampler works in σ_data-scaled latents internally, as the
  reference EDM model's ``encode`` / ``decode`` do); ``generate_latents`` adds the noise and mask defaults.

Both CFG branches run as ONE model call on the batch-concatenated [cond; uncond] inputs. The model enters only
through a callable, so the same code serves the inference CLI and the trainer's sample callback (both through
``inference/pipeline.py``); wrap the samplers in ``jax.jit`` (schedules and guidance form are static).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v2w_jax.diffusion import edm as edm_lib
from v2w_jax.diffusion import guidance as guidance_lib
from v2w_jax.diffusion.edm_sampler import EDMTrajectory, edm_sample
from v2w_jax.diffusion.timesteps import RFSchedule, edm_karras_sigmas, rf_unipc_schedule
from v2w_jax.diffusion.unipc import UniPCTrajectory, unipc_sample

Array = jax.Array
# denoise_fn(x_in [B', C, T, H, W], timesteps [B', 1] or [B', T], text_embeddings (pytree, leading B'),
#            cond_mask [B', 1, T, 1, 1]) -> velocity (RF) or x0 (EDM) [B', C, T, H, W].
# The raw network (net_fn) has the same signature and returns the velocity (RF) or the EDM F.
DenoiseFn = Callable[[Array, Array, Any, Array], Array]


def _is_static_zero(g: Any) -> bool:
  return isinstance(g, (int, float)) and g == 0


def _branches(denoise_fn: DenoiseFn, x_in: Array, timesteps: Array, text: Any, uncond_text: Any,
              mask: Array, guidance: Any, form: str) -> tuple[Array, Array, Array | None]:
  """Guided output plus the two branch outputs (uncond is None when guidance is a static 0)."""
  if _is_static_zero(guidance):
    out_c = denoise_fn(x_in, timesteps, text, mask)
    return out_c, out_c, None
  if uncond_text is None:
    raise ValueError("guidance != 0 needs uncond_text_embeddings (the reference's callback uses all-zero text)")
  out_c, out_u = guidance_lib.batched_cfg_call(
      denoise_fn, (x_in, timesteps, text, mask), (x_in, timesteps, uncond_text, mask))
  return out_c, out_u, out_u


def sample_rf(
    denoise_fn: DenoiseFn,
    noise: Array,
    schedule: RFSchedule,
    *,
    text_embeddings: Any,
    uncond_text_embeddings: Any | None,
    gt_latents: Array | None,
    cond_mask: Array,
    guidance: float | Array = 7.0,
    conditional_frame_timestep: float = -1.0,
    guidance_form: str = "video2world",
    paste_gt_at_end: bool = False,
    return_trajectory: bool = False,
) -> Array | tuple[Array, UniPCTrajectory]:
  """Rectified-flow Video2World sampling (jittable core of ``generate_latents``).

  Per step (reference semantics): x_in = M gt + (1 - M) x; net time trunc(1000 sigma_k) for all frames (or
  ``conditional_frame_timestep`` on conditional frames when >= 0); both branches' velocities get n - gt on
  conditional frames (n = ``noise``, the initial noise); v = v_c + g (v_c - v_u); UniPC step.

  Args:
    denoise_fn: the velocity network, see ``DenoiseFn``.
    noise: [B, C, T, H, W] initial noise n (also the starting sample).
    schedule: ``timesteps.rf_unipc_schedule(...)``.
    text_embeddings / uncond_text_embeddings: conditional / negative-prompt embeddings (leading axis B);
      uncond None (or a static guidance 0) runs the conditional branch only.
    gt_latents: [B, C, T, H, W] clean conditional latents (None: zeros, only valid with no conditional frames).
    cond_mask: [B, 1, T, 1, 1], 1 on conditional latent frames.
    guidance: g in the ``guidance_form`` formula (python float, or array broadcastable to [B, ...]).
    paste_gt_at_end: optional fix of reference quirk 2 (conditional frames end near, not at, gt); off = reference.
    return_trajectory: also return the UniPC per-step records.
  """
  guidance_lib.check_mask(cond_mask, noise)
  gt = jnp.zeros_like(noise) if gt_latents is None else gt_latents.astype(noise.dtype)
  if gt.shape != noise.shape:
    raise ValueError(f"sample_rf: gt_latents shape {gt.shape} != noise shape {noise.shape}")
  mask = jnp.broadcast_to(cond_mask, (noise.shape[0],) + cond_mask.shape[1:]).astype(noise.dtype)

  def velocity_fn(x: Array, timesteps_b_1: Array) -> Array:
    x_in = guidance_lib.impose_input_frames(x, gt, mask)
    ts = guidance_lib.frame_timesteps(timesteps_b_1, mask, conditional_frame_timestep)
    v_c, v_u, _ = _branches(denoise_fn, x_in, ts, text_embeddings, uncond_text_embeddings, mask, guidance,
                            guidance_form)
    v_c = guidance_lib.impose_rf_velocity(v_c.astype(x.dtype), noise, gt, mask)
    v_u = guidance_lib.impose_rf_velocity(v_u.astype(x.dtype), noise, gt, mask)
    return guidance_lib.cfg_combine(v_c, v_u, guidance, form=guidance_form)

  out = unipc_sample(velocity_fn, noise, schedule, return_trajectory=return_trajectory)
  final = out[0] if return_trajectory else out
  if paste_gt_at_end:
    final = guidance_lib.impose_x0_frames(final, gt, mask)
  return (final, out[1]) if return_trajectory else final


def edm_denoiser(net_fn: DenoiseFn, *, sigma_data: float = 0.5, scaling: str = "edm",
                 sigma_conditional: float = 1e-4) -> DenoiseFn:
  """The EDM x0 denoiser of the reference ``Video2WorldModel.denoise`` around the raw network.

  ``net_fn(net_in, c_noise [B', T], text, mask) -> F``. The returned ``denoise(x_in, sigma [B', 1], text, mask)``
  expects ``x_in`` with the clean (σ_data-scaled) latents on conditional frames (``sample_edm`` puts them
  there) and computes: net input c_in x_in on noisy frames and x_in / σ_data (= gt / σ_data) on conditional
  ones; per-frame c_noise, c_noise(σ_conditional) on conditional frames; x0 = c_skip x_in + c_out F (its
  conditional frames are replaced by gt afterwards, so c_skip/c_out do not matter there). The same
  preconditioning as the training loss: both call ``edm.precondition``.
  """

  def denoise(x_in: Array, sigma_b_1: Array, text: Any, mask: Array) -> Array:
    x_in = x_in.astype(jnp.float32)
    sigma = jnp.asarray(sigma_b_1, jnp.float32).reshape(x_in.shape[0], 1, 1, 1, 1)
    # x_in already holds gt on the conditional frames, so it is both x_sigma and gt.
    return edm_lib.precondition(lambda net_in, c_noise: net_fn(net_in, c_noise, text, mask), x_in, x_in,
                                sigma, mask, sigma_data=sigma_data, scaling=scaling,
                                sigma_conditional=sigma_conditional)

  return denoise


def sample_edm(
    denoise_fn: DenoiseFn,
    noise: Array,
    sigmas: np.ndarray,
    *,
    text_embeddings: Any,
    uncond_text_embeddings: Any | None,
    gt_latents: Array | None,
    cond_mask: Array,
    guidance: float | Array = 7.0,
    state_dtype: Any = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, EDMTrajectory]:
  """EDM Video2World sampling with the 2ab solver.

  ``denoise_fn(x_in, sigma [B', 1], text, cond_mask) -> x0`` is the preconditioned denoiser (see
  ``edm_denoiser``); it receives x_in = M gt + (1 - M) x (clean latents on conditional frames, which its net
  input uses), and its output gets gt on conditional frames in both branches, then D = D_c + g (D_c - D_u).
  x_0 = sigma_max * noise; the state dtype is ``state_dtype`` (default: noise dtype). The returned final
  denoise D(x_N, sigma_min) therefore equals gt on conditional frames.

  ``gt_latents`` are in the model's latent scale (the reference's ``encode`` multiplies by sigma_data).
  """
  guidance_lib.check_mask(cond_mask, noise)
  dtype = noise.dtype if state_dtype is None else state_dtype
  gt = jnp.zeros(noise.shape, jnp.float32) if gt_latents is None else gt_latents.astype(jnp.float32)
  mask = jnp.broadcast_to(cond_mask, (noise.shape[0],) + cond_mask.shape[1:]).astype(jnp.float32)

  def x0_fn(x: Array, sigma_b_1: Array) -> Array:
    x_in = guidance_lib.impose_input_frames(x, gt, mask)
    d_c, d_u, _ = _branches(denoise_fn, x_in, sigma_b_1, text_embeddings, uncond_text_embeddings, mask, guidance,
                            "video2world")
    # As in the reference, the guided x0 is formed in float32 and promoted to the state dtype by edm_sample.
    d_c = guidance_lib.impose_x0_frames(d_c.astype(jnp.float32), gt, mask)
    d_u = guidance_lib.impose_x0_frames(d_u.astype(jnp.float32), gt, mask)
    return guidance_lib.cfg_combine(d_c, d_u, guidance)

  x_init = (float(np.asarray(sigmas)[0]) * noise.astype(jnp.float32)).astype(dtype)
  return edm_sample(x0_fn, x_init, sigmas, return_trajectory=return_trajectory)


@dataclasses.dataclass(frozen=True)
class RFSampler:
  """Rectified-flow UniPC sampling settings (reference defaults: 35 steps, shift 5)."""

  num_steps: int = 35
  shift: float = 5.0
  use_karras_sigmas: bool = False
  conditional_frame_timestep: float = -1.0
  guidance_form: str = "video2world"
  paste_gt_at_end: bool = False

  def __call__(self, net_fn: DenoiseFn, noise: Array, *, text_embeddings: Any, uncond_text_embeddings: Any | None,
               gt_latents: Array | None, cond_mask: Array, guidance: float | Array = 7.0) -> Array:
    """Latents [B, C, T, H, W] float32 from ``noise``; ``net_fn`` predicts the velocity (see ``sample_rf``)."""
    schedule = rf_unipc_schedule(self.num_steps, self.shift, use_karras_sigmas=self.use_karras_sigmas)
    return sample_rf(net_fn, noise, schedule, text_embeddings=text_embeddings,
                     uncond_text_embeddings=uncond_text_embeddings, gt_latents=gt_latents, cond_mask=cond_mask,
                     guidance=guidance, conditional_frame_timestep=self.conditional_frame_timestep,
                     guidance_form=self.guidance_form, paste_gt_at_end=self.paste_gt_at_end)


@dataclasses.dataclass(frozen=True)
class EDMSampler:
  """EDM 2ab sampling settings (reference class defaults: 35 steps, Karras 80 -> 0.0002, rho 7, σ_data 0.5)."""

  num_steps: int = 35
  sigma_max: float = 80.0
  sigma_min: float = 0.0002
  sigma_data: float = 0.5
  scaling: str = "edm"
  sigma_conditional: float = 1e-4

  def __call__(self, net_fn: DenoiseFn, noise: Array, *, text_embeddings: Any, uncond_text_embeddings: Any | None,
               gt_latents: Array | None, cond_mask: Array, guidance: float | Array = 7.0) -> Array:
    """Normalised latents [B, C, T, H, W] float32; ``net_fn`` returns the raw F (see ``edm_denoiser``).

    ``gt_latents`` are normalised VAE latents like the result: they are multiplied by σ_data for the sampler
    and the sample divided by it, as the reference EDM model's ``encode`` / ``decode``.
    """
    sigmas = edm_karras_sigmas(self.num_steps, self.sigma_max, self.sigma_min)
    denoise = edm_denoiser(net_fn, sigma_data=self.sigma_data, scaling=self.scaling,
                           sigma_conditional=self.sigma_conditional)
    gt = None if gt_latents is None else gt_latents.astype(jnp.float32) * self.sigma_data
    out = sample_edm(denoise, noise, sigmas, text_embeddings=text_embeddings,
                     uncond_text_embeddings=uncond_text_embeddings, gt_latents=gt, cond_mask=cond_mask,
                     guidance=guidance)
    return out / self.sigma_data


Sampler = RFSampler | EDMSampler


def make_sampler(objective: Any, num_steps: int = 35, shift: float = 5.0, *, use_karras_sigmas: bool = False,
                 guidance_form: str = "video2world") -> Sampler:
  """The inference sampler matching a training objective (``objective.make_objective``; None = RF defaults).

  Rectified flow: UniPC with ``shift`` and the objective's ``conditional_frame_timestep``. EDM: 2ab on the
  Karras grid from the objective's sigma_max to sigma_min, with its σ_data, scaling and σ_conditional
  (``shift``, ``use_karras_sigmas`` and ``guidance_form`` do not apply).
  """
  name = getattr(objective, "name", "rectified_flow") if objective is not None else "rectified_flow"
  if name == "rectified_flow":
    return RFSampler(num_steps=int(num_steps), shift=float(shift), use_karras_sigmas=bool(use_karras_sigmas),
                     conditional_frame_timestep=float(getattr(objective, "conditional_frame_timestep", -1.0)),
                     guidance_form=guidance_form)
  if name == "edm":
    return EDMSampler(num_steps=int(num_steps), sigma_max=float(objective.sigma_max),
                      sigma_min=float(objective.sigma_min), sigma_data=float(objective.sigma_data),
                      scaling=str(objective.scaling), sigma_conditional=float(objective.sigma_conditional))
  raise ValueError(f"make_sampler: unknown objective {name!r} (expected 'rectified_flow' or 'edm')")


def generate_latents(
    net_fn: DenoiseFn,
    shape: Sequence[int],
    *,
    text_embeddings: Any,
    uncond_text_embeddings: Any | None = None,
    gt_latents: Array | None = None,
    num_conditional_frames: int | Sequence[int] = 0,
    cond_mask: Array | None = None,
    guidance: float = 7.0,
    sampler: Sampler = RFSampler(),
    seed: int | None = 1,
    key: Array | None = None,
    noise: Array | None = None,
    jit: bool = True,
) -> Array:
  """Video2World latents with ``sampler`` (default: the reference RF UniPC, 35 steps, shift 5) and g = 7.

  Noise: ``noise`` if given, else ``jax.random.normal(key)`` if a key is given, else the reference's
  ``numpy.random.RandomState(seed).standard_normal(shape).astype(float32)``. The mask comes from ``cond_mask``
  or ``num_conditional_frames`` (first N latent frames). Returns [B, C, T, H, W] float32 latents (not decoded).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != 5:
    raise ValueError(f"latent shape must be [B, C, T, H, W], got {shape}")
  if noise is None:
    noise = guidance_lib.initial_noise(shape, seed, key=key)
  elif tuple(noise.shape) != shape:
    raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {shape}")
  if cond_mask is None:
    cond_mask = guidance_lib.conditional_frame_mask(num_conditional_frames, shape[0], shape[2], noise.dtype)

  def run(noise, text, uncond_text, gt, mask):
    return sampler(net_fn, noise, text_embeddings=text, uncond_text_embeddings=uncond_text, gt_latents=gt,
                   cond_mask=mask, guidance=guidance)

  if jit:
    run = jax.jit(run)
  return run(noise, text_embeddings, uncond_text_embeddings, gt_latents, cond_mask)
