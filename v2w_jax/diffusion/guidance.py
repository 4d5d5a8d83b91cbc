"""Classifier-free guidance and inference-time conditional-frame re-imposition (Video2World).

Layout: latents are [B, C, T, H, W]; the conditional-frame mask is [B, 1, T, 1, 1] with 1 on the first N
latent frames. Reference behaviour (``training_spec.md`` §3, §11; fixtures ``samplers/README.md`` §1, §3):

* Guidance, video2world form (RF and EDM): out = cond + g (cond - uncond), so g = 7 equals a classic CFG
  scale of 8. The reference text2world RF class uses uncond + g (cond - uncond) instead (``form="text2world"``).
* Both branches see the same conditional frames (no CFG on them); only the text embedding differs.
* RF: the net input's conditional frames are the clean latents (x_in = M gt + (1 - M) x), and on those frames
  the velocity is replaced by n - gt, n being the *initial* noise (reference quirk 4).
* EDM: the x0 prediction's conditional frames are replaced by gt.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

GUIDANCE_FORMS = ("video2world", "text2world")


def cfg_combine(cond: Array, uncond: Array, guidance: float | Array, *, form: str = "video2world") -> Array:
  """Combines the two branch outputs.

  Args:
    cond, uncond: branch outputs (velocity or x0), same shape.
    guidance: g (python float or array broadcastable to the outputs, e.g. [B, 1, 1, 1, 1]).
    form: "video2world" -> cond + g (cond - uncond) (RF and EDM Video2World, the reference default);
      "text2world" -> uncond + g (cond - uncond) (the reference's text2world RF class).
  """
  if form == "video2world":
    return cond + guidance * (cond - uncond)
  if form == "text2world":
    return uncond + guidance * (cond - uncond)
  raise ValueError(f"cfg_combine: unknown guidance form {form!r}; expected one of {GUIDANCE_FORMS}")


def batched_cfg_call(fn: Callable[..., Array], cond_args: Sequence[Any], uncond_args: Sequence[Any]
                     ) -> tuple[Array, Array]:
  """Runs both CFG branches as ONE call of ``fn`` on the batch-concatenated arguments.

  ``cond_args`` and ``uncond_args`` are positional arguments of ``fn`` (pytrees of arrays with a leading batch
  axis of equal size B); each pair is concatenated along axis 0, ``fn`` is called once on 2B samples and the
  output is split back into (cond_out, uncond_out).
  """
  if len(cond_args) != len(uncond_args):
    raise ValueError(f"batched_cfg_call: {len(cond_args)} cond vs {len(uncond_args)} uncond arguments")
  args = [jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), c, u)
          for c, u in zip(cond_args, uncond_args)]
  out = fn(*args)
  half = out.shape[0] // 2
  return out[:half], out[half:]


def conditional_frame_mask(num_conditional_frames: int | Sequence[int] | Array, batch: int, num_frames: int,
                           dtype: Any = jnp.float32) -> Array:
  """[B, 1, T, 1, 1] mask with 1 on latent frames [0, N) (N per sample or shared)."""
  n = jnp.broadcast_to(jnp.asarray(num_conditional_frames), (batch,))
  mask = (jnp.arange(num_frames)[None, :] < n[:, None]).astype(dtype)
  return mask[:, None, :, None, None]


def check_mask(mask: Array, x: Array, name: str = "cond_mask") -> None:
  """Raises a clear error unless ``mask`` is [B or 1, 1, T, 1, 1] for latents ``x`` [B, C, T, H, W]."""
  if x.ndim != 5:
    raise ValueError(f"expected latents [B, C, T, H, W], got shape {tuple(x.shape)}")
  if mask.ndim != 5 or mask.shape[1] != 1 or mask.shape[3:] != (1, 1) or mask.shape[2] != x.shape[2] \
      or mask.shape[0] not in (1, x.shape[0]):
    raise ValueError(f"{name} must have shape [B, 1, T, 1, 1] matching latents {tuple(x.shape)}, "
                     f"got {tuple(mask.shape)}")


def impose_input_frames(x: Array, gt: Array, mask: Array) -> Array:
  """Net input with clean conditional frames: M gt + (1 - M) x."""
  return gt * mask + x * (1 - mask)


def impose_rf_velocity(v: Array, noise: Array, gt: Array, mask: Array) -> Array:
  """RF velocity with the exact target n - gt on conditional frames (n = the initial noise)."""
  return (noise - gt) * mask + v * (1 - mask)


def impose_x0_frames(x0: Array, gt: Array, mask: Array) -> Array:
  """EDM x0 prediction with gt on conditional frames."""
  return gt * mask + x0 * (1 - mask)


def frame_timesteps(timesteps_b_1: Array, mask: Array, conditional_frame_timestep: float) -> Array:
  """Per-frame net timesteps.

  ``conditional_frame_timestep`` < 0 (nemo): conditional frames share the noisy timestep -> (B, 1) unchanged.
  Otherwise -> (B, T) with that value on conditional frames (post-trained config: 0.1, i.e. net time 1e-4).
  """
  if conditional_frame_timestep < 0:
    return timesteps_b_1
  m = mask[:, 0, :, 0, 0].astype(timesteps_b_1.dtype)  # (B, T)
  return conditional_frame_timestep * m + timesteps_b_1 * (1 - m)


def initial_noise(shape: Sequence[int], seed: int | None = None, *, key: Array | None = None,
                  dtype: Any = jnp.float32) -> Array:
  """Initial sampler noise.

  With ``seed`` (and no key): the reference's architecture-invariant
  ``numpy.random.RandomState(seed).standard_normal(shape).astype(float32)``. With ``key``: ``jax.random.normal``.
  """
  if key is not None:
    return jax.random.normal(key, tuple(shape), dtype=dtype)
  if seed is None:
    raise ValueError("initial_noise: give a numpy seed or a jax key")
  return jnp.asarray(np.random.RandomState(seed).standard_normal(tuple(shape)).astype(np.float32), dtype=dtype)
