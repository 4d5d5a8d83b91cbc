"""Sample videos during training, with the regular and the EMA parameters (reference
``every_n_sample_reg`` / ``every_n_sample_ema``).

Every ``trainer.sample_iter`` steps: the first clip of the current training batch gives the text
embedding and ``trainer.sample_num_conditional_frames`` clean conditional latent frames; the
inference pipeline (``inference/pipeline.py``, the one sampling path of the project) generates a clip
with the sampler of the training objective (rectified flow: UniPC, shift 5; EDM: 2ab), with
``trainer.sample_num_steps`` steps, guidance ``trainer.sample_guidance`` and all-zero text for the
unconditional branch as the reference callback; the VAE decodes it, and
``<job>/samples/step_<N>_{reg,ema}.mp4`` is written next to the ground truth ``step_<N>_gt.mp4`` (the
VAE reconstruction of the clip; with a latent cache, the decode of its cached latents) and logged.
Every process runs the SPMD computation on process 0's clip; only process 0 writes. The pipeline
compiles its functions once (the parameters are arguments).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from v2w_jax.data.video import write_mp4
from v2w_jax.diffusion.objective import make_objective
from v2w_jax.inference.pipeline import Video2WorldPipeline
from v2w_jax.training import ema as ema_lib

# The reference samples with the scheduler's default shift (the objective's shift 5 for RF).
SAMPLE_SHIFT = 5.0


class SampleWriter:
  """Generates, decodes and writes sample clips through one :class:`Video2WorldPipeline`."""

  def __init__(self, config, model, mesh, workdir: pathlib.Path, logger):
    self.enabled = int(config.trainer.get("sample_iter", 0)) > 0
    self.dir = workdir / "samples"
    self.logger = logger
    self.num_cond = int(config.trainer.sample_num_conditional_frames)
    self.guidance = float(config.trainer.sample_guidance)
    self.num_steps = int(config.trainer.sample_num_steps)
    self.seed = int(config.seed)
    self.pipeline = None
    if self.enabled:
      # Parameters come with each call (regular / EMA, sharded as the train state); the VAE's are fixed.
      self.pipeline = Video2WorldPipeline(model.dit_cfg, model.vae_cfg, None, model.vae_params,
                                          objective=make_objective(config), mesh=mesh)

  def write(self, step: int, state: Any, host_batch: dict) -> list[pathlib.Path]:
    """Samples with ``state.params`` (and ``state.ema_params`` if any); returns the written paths."""
    if not self.enabled:
      return []
    pipe = self.pipeline
    # Every process runs the (SPMD) sampler on process 0's first clip. A latent-cache batch carries the
    # clip's VAE means instead of its pixels: nothing to encode.
    cached = "latents" in host_batch
    clips, text = multihost_utils.broadcast_one_to_all(
        (np.asarray(host_batch["latents" if cached else "video"][:1]), np.asarray(host_batch["text_embeddings"][:1])))
    if cached:
      shape = clips.shape
    else:
      clip = clips[0]  # uint8 [3, T, H, W]
      shape = pipe.latent_shape(clip.shape[1], clip.shape[2:])
    if not 0 <= self.num_cond < shape[2]:
      raise ValueError(f"trainer.sample_num_conditional_frames={self.num_cond} must be in [0, {shape[2]}) for "
                       f"clips of {shape[2]} latent frames")
    # The whole clip's latents: the sampler reads the first N frames, their decode is the gt video.
    gt = pipe.latents_from_means(clips) if cached else pipe.encode_conditional(clip, shape, shape[2])
    text = pipe.text_embedding(text)
    outputs = {"gt": gt}
    variants = [("reg", state.params)] + ([("ema", ema_lib.to_device(state.ema_params))]
                                           if state.ema_params is not None else [])
    for name, params in variants:
      outputs[name] = pipe.sample_latents(shape, text, None, gt, self.num_cond, seed=self.seed + step,
                                          guidance=self.guidance, num_steps=self.num_steps, shift=SAMPLE_SHIFT,
                                          dit_params=params)
    written = []
    for name in [n for n, _ in variants] + ["gt"]:
      frames = np.asarray(jax.device_get(pipe.decode(outputs[name])))
      if jax.process_index() != 0:
        continue
      path = self.dir / f"step_{step:09d}_{name}.mp4"
      write_mp4(path, frames)
      if name != "gt":
        self.logger.log_video(step, f"samples/{name}", path)
      written.append(path)
    return written
