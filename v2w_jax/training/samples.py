"""Sample videos during training, with the regular and the EMA parameters (reference
``every_n_sample_reg`` / ``every_n_sample_ema``).

Every ``trainer.sample_iter`` steps: the first clip of the current training batch gives the text
embedding and ``trainer.sample_num_conditional_frames`` clean conditional latent frames; the
rectified-flow UniPC sampler (``trainer.sample_num_steps`` steps, guidance
``trainer.sample_guidance``, all-zero text for the unconditional branch as the reference callback)
generates a clip, the VAE decodes it, and ``<job>/samples/step_<N>_{reg,ema}.mp4`` is written next
to the ground truth ``step_<N>_gt.mp4`` and logged to wandb.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from v2w_jax.data.video import write_mp4
from v2w_jax.diffusion import guidance as guidance_lib
from v2w_jax.diffusion import samplers
from v2w_jax.diffusion import timesteps as timesteps_lib
from v2w_jax.models import dit
from v2w_jax.models import vae as vae_lib


def to_uint8_frames(video: jax.Array | np.ndarray) -> np.ndarray:
  """[3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] ((x + 1) / 2, as the reference saves)."""
  x = np.asarray(video, np.float32)
  x = np.clip((x + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
  return x.transpose(1, 2, 3, 0)


class SampleWriter:
  """Generates, decodes and writes sample clips; the sampling function is compiled once."""

  def __init__(self, config, model, mesh, workdir: pathlib.Path, logger):
    self.enabled = int(config.trainer.get("sample_iter", 0)) > 0
    self.dir = workdir / "samples"
    self.logger = logger
    self.model = model
    self.num_cond = int(config.trainer.sample_num_conditional_frames)
    self.guidance = float(config.trainer.sample_guidance)
    self.schedule = timesteps_lib.rf_unipc_schedule(int(config.trainer.sample_num_steps), shift=5.0)
    self.seed = int(config.seed)
    self.mesh = mesh
    apply = dit.apply_fn(model.dit_cfg)
    vae_cfg = model.vae_cfg

    def generate(params, vae_params, video_u8, text, noise):
      latents = vae_lib.encode_video(vae_cfg, vae_params, vae_lib.uint8_to_unit_range(video_u8))
      b, _, t, h, w = latents.shape
      mask = guidance_lib.conditional_frame_mask(self.num_cond, b, t)

      def denoise(x, ts, txt, m):
        return apply(params, x, ts, txt, jnp.broadcast_to(m, (x.shape[0], 1, t, h, w)))

      out = samplers.sample_rf(denoise, noise.astype(jnp.float32), self.schedule, text_embeddings=text,
                               uncond_text_embeddings=jnp.zeros_like(text), gt_latents=latents,
                               cond_mask=mask, guidance=self.guidance)
      return vae_lib.decode_latents(vae_cfg, vae_params, out), vae_lib.decode_latents(vae_cfg, vae_params, latents)

    self._generate = jax.jit(generate)

  def write(self, step: int, state: Any, host_batch: dict) -> list[pathlib.Path]:
    if not self.enabled:
      return []
    # Every process runs the (SPMD) sampler on process 0's first clip.
    video, text = multihost_utils.broadcast_one_to_all(
        (np.asarray(host_batch["video"][:1]), np.asarray(host_batch["text_embeddings"][:1])))
    lat_shape = vae_lib.WanVAE(self.model.vae_cfg).latent_shape(video.shape)
    noise = np.random.RandomState(self.seed + step).standard_normal(lat_shape).astype(np.float32)
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    put = lambda x: jax.device_put(x, rep)  # noqa: E731 - one clip, replicated
    written = []
    variants = [("reg", state.params)] + ([("ema", state.ema_params)] if state.ema_params is not None else [])
    for name, params in variants:
      with jax.set_mesh(self.mesh):
        sample, gt = self._generate(params, self.model.vae_params, put(video), put(text), put(noise))
      sample, gt = jax.device_get((sample, gt))
      if jax.process_index() != 0:
        continue
      path = self.dir / f"step_{step:09d}_{name}.mp4"
      write_mp4(path, to_uint8_frames(sample[0]))
      self.logger.log_video(step, f"samples/{name}", path)
      written.append(path)
      if name == "reg":
        gt_path = self.dir / f"step_{step:09d}_gt.mp4"
        write_mp4(gt_path, to_uint8_frames(gt[0]))
        written.append(gt_path)
    return written
