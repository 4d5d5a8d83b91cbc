"""Video2World inference sampling: schedule + noise + conditional frames + CFG + solver, in one place.

* ``sample_rf`` / ``generate_latents``: rectified flow with UniPC (``unipc.py``), what the nemo run and the
  released checkpoints use (``training_spec.md`` §11).
* ``sample_edm`` / ``generate_latents_edm``: the EDM path with the 2ab sampler (``edm_sampler.py``).

Both CFG branches run as ONE model call on the batch-concatenated [cond; uncond] inputs. The model enters only
through a callable, so the same code serves the inference CLI and the trainer's sample callback; wrap
``sample_rf`` in ``jax.jit`` (the schedule and guidance form are static Python values).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v2w_jax.diffusion import guidance as guidance_lib
from v2w_jax.diffusion.edm_sampler import EDMTrajectory, edm_sample
from v2w_jax.diffusion.timesteps import RFSchedule, edm_karras_sigmas, rf_unipc_schedule
from v2w_jax.diffusion.unipc import UniPCTrajectory, unipc_sample

Array = jax.Array
# denoise_fn(x_in [B', C, T, H, W], timesteps [B', 1] or [B', T], text_embeddings (pytree, leading B'),
#            cond_mask [B', 1, T, 1, 1]) -> velocity (RF) or x0 (EDM) [B', C, T, H, W]
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


def _mask_and_noise(shape: Sequence[int], num_conditional_frames: Any, cond_mask: Array | None,
                    noise: Array | None, seed: int | None, key: Array | None) -> tuple[Array, Array]:
  shape = tuple(int(s) for s in shape)
  if len(shape) != 5:
    raise ValueError(f"latent shape must be [B, C, T, H, W], got {shape}")
  if noise is None:
    noise = guidance_lib.initial_noise(shape, seed, key=key)
  elif tuple(noise.shape) != shape:
    raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {shape}")
  if cond_mask is None:
    cond_mask = guidance_lib.conditional_frame_mask(num_conditional_frames, shape[0], shape[2], noise.dtype)
  return cond_mask, noise


def generate_latents(
    denoise_fn: DenoiseFn,
    shape: Sequence[int],
    *,
    text_embeddings: Any,
    uncond_text_embeddings: Any | None = None,
    gt_latents: Array | None = None,
    num_conditional_frames: int | Sequence[int] = 0,
    cond_mask: Array | None = None,
    guidance: float = 7.0,
    num_steps: int = 35,
    shift: float = 5.0,
    use_karras_sigmas: bool = False,
    conditional_frame_timestep: float = -1.0,
    seed: int | None = 1,
    key: Array | None = None,
    noise: Array | None = None,
    guidance_form: str = "video2world",
    paste_gt_at_end: bool = False,
    jit: bool = True,
) -> Array:
  """Rectified-flow Video2World latents with the reference defaults (35 steps, shift 5, g = 7, seed 1).

  Noise: ``noise`` if given, else ``jax.random.normal(key)`` if a key is given, else the reference's
  ``numpy.random.RandomState(seed).standard_normal(shape).astype(float32)``. The mask comes from ``cond_mask``
  or ``num_conditional_frames`` (first N latent frames). Returns [B, C, T, H, W] float32 latents (not decoded).
  """
  cond_mask, noise = _mask_and_noise(shape, num_conditional_frames, cond_mask, noise, seed, key)
  schedule = rf_unipc_schedule(num_steps, shift, use_karras_sigmas=use_karras_sigmas)

  def run(noise, text, uncond_text, gt, mask):
    return sample_rf(denoise_fn, noise, schedule, text_embeddings=text, uncond_text_embeddings=uncond_text,
                     gt_latents=gt, cond_mask=mask, guidance=guidance,
                     conditional_frame_timestep=conditional_frame_timestep, guidance_form=guidance_form,
                     paste_gt_at_end=paste_gt_at_end)

  if jit:
    run = jax.jit(run)
  return run(noise, text_embeddings, uncond_text_embeddings, gt_latents, cond_mask)


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

  ``denoise_fn(x, sigma [B', 1], text, cond_mask) -> x0`` is the preconditioned denoiser (c_skip x + c_out F,
  with the net input's conditional frames = clean latents and their c_noise at sigma_conditional); here its
  output gets gt on conditional frames in both branches, then D = D_c + g (D_c - D_u).
  x_0 = sigma_max * noise; the state dtype is ``state_dtype`` (default: noise dtype).

  ``gt_latents`` are in the model's latent scale (the reference's ``encode`` multiplies by sigma_data).
  """
  guidance_lib.check_mask(cond_mask, noise)
  dtype = noise.dtype if state_dtype is None else state_dtype
  gt = jnp.zeros(noise.shape, jnp.float32) if gt_latents is None else gt_latents.astype(jnp.float32)
  mask = jnp.broadcast_to(cond_mask, (noise.shape[0],) + cond_mask.shape[1:]).astype(jnp.float32)

  def x0_fn(x: Array, sigma_b_1: Array) -> Array:
    d_c, d_u, _ = _branches(denoise_fn, x, sigma_b_1, text_embeddings, uncond_text_embeddings, mask, guidance,
                            "video2world")
    # As in the reference, the guided x0 is formed in float32 and promoted to the state dtype by edm_sample.
    d_c = guidance_lib.impose_x0_frames(d_c.astype(jnp.float32), gt, mask)
    d_u = guidance_lib.impose_x0_frames(d_u.astype(jnp.float32), gt, mask)
    return guidance_lib.cfg_combine(d_c, d_u, guidance)

  x_init = (float(np.asarray(sigmas)[0]) * noise.astype(jnp.float32)).astype(dtype)
  return edm_sample(x0_fn, x_init, sigmas, return_trajectory=return_trajectory)


def generate_latents_edm(
    denoise_fn: DenoiseFn,
    shape: Sequence[int],
    *,
    text_embeddings: Any,
    uncond_text_embeddings: Any | None = None,
    gt_latents: Array | None = None,
    num_conditional_frames: int | Sequence[int] = 0,
    cond_mask: Array | None = None,
    guidance: float = 7.0,
    num_steps: int = 35,
    sigma_max: float = 80.0,
    sigma_min: float = 0.0002,
    seed: int | None = 1,
    key: Array | None = None,
    noise: Array | None = None,
    jit: bool = True,
) -> Array:
  """EDM Video2World latents (reference class defaults: 35 steps, Karras 80 -> 0.0002, rho 7, g = 7)."""
  cond_mask, noise = _mask_and_noise(shape, num_conditional_frames, cond_mask, noise, seed, key)
  sigmas = edm_karras_sigmas(num_steps, sigma_max, sigma_min)

  def run(noise, text, uncond_text, gt, mask):
    return sample_edm(denoise_fn, noise, sigmas, text_embeddings=text, uncond_text_embeddings=uncond_text,
                      gt_latents=gt, cond_mask=mask, guidance=guidance)

  if jit:
    run = jax.jit(run)
  return run(noise, text_embeddings, uncond_text_embeddings, gt_latents, cond_mask)
