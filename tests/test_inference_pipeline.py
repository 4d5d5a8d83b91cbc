"""The Video2World inference pipeline on the tiny config with random weights (CPU).

Checks determinism, that both CFG branches in one batch give the unguided result when their texts agree,
that encoding only the conditional frames equals encoding the reference's full padded clip (VAE
causality), that the conditional latent frame ends where the reference's RF sampler puts it, and that
weights read back from a reference-format ``.pt`` reproduce the output exactly. The EDM objective
(configs/nemo_edm.py on the tiny sizes): deterministic, conditional frames end exactly at gt (x0
replacement), and the same result as the sampler library on the preconditioned DiT.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import torch_pt
from v2w_jax.diffusion import guidance as guidance_lib
from v2w_jax.diffusion import samplers
from v2w_jax.diffusion.objective import make_objective
from v2w_jax.diffusion.timesteps import rf_unipc_schedule
from v2w_jax.inference import conditioning, weights
from v2w_jax.inference.pipeline import GenerationRequest, Video2WorldPipeline
from v2w_jax.models import dit as dit_lib
from v2w_jax.models import vae as vae_lib
from v2w_jax.models.dit_config import DiTConfig

SIZE, FRAMES, STEPS = (32, 48), 9, 2


@pytest.fixture(scope="module")
def pipe() -> Video2WorldPipeline:
  config = tiny.get_config()
  dit_cfg = DiTConfig.from_config(config.model)
  vae_cfg = vae_lib.VAEConfig.from_config(config.vae)
  return Video2WorldPipeline(dit_cfg, vae_cfg, weights.random_dit_params(dit_cfg, 0),
                             weights.random_vae_params(vae_cfg, 0))


@pytest.fixture(scope="module")
def texts(pipe):
  rng = np.random.default_rng(0)
  d = pipe.dit_cfg.text_in_channels
  return rng.standard_normal((16, d)).astype(np.float32), rng.standard_normal((16, d)).astype(np.float32)


@pytest.fixture(scope="module")
def cond_frames():
  rng = np.random.default_rng(1)
  clip = rng.integers(0, 256, (7, 40, 64, 3), dtype=np.uint8)
  return conditioning.resize_and_crop(clip[-5:], SIZE)  # what a video input with N = 2 gives


def _req(text, neg=None, **kw):
  base = dict(text_embedding=text, negative_text_embedding=neg, num_frames=FRAMES, size=SIZE, num_steps=STEPS,
              seed=0, guidance=7.0)
  base.update(kw)
  return GenerationRequest(**base)


def test_deterministic_shapes_and_seed(pipe, texts):
  a = pipe.generate(_req(*texts))
  b = pipe.generate(_req(*texts))
  assert a.video.shape == (FRAMES, *SIZE, 3) and a.video.dtype == np.uint8
  assert a.latents.shape == (1, 16, 3, SIZE[0] // 8, SIZE[1] // 8)
  np.testing.assert_array_equal(a.video, b.video)
  np.testing.assert_array_equal(a.latents, b.latents)
  c = pipe.generate(_req(*texts, seed=1))
  assert np.abs(c.latents - a.latents).mean() > 1e-2
  assert set(a.timings) == {"encode", "dit", "decode", "total"}


def test_batched_cfg_with_equal_texts_is_unguided(pipe, texts):
  text, _ = texts
  guided = pipe.generate(_req(text, text, guidance=7.0)).latents
  plain = pipe.generate(_req(text, None, guidance=0.0)).latents
  np.testing.assert_allclose(guided, plain, rtol=0, atol=1e-5)
  # ...and a real negative prompt changes the result.
  other = pipe.generate(_req(*texts, guidance=7.0)).latents
  assert np.abs(other - plain).mean() > 1e-3


def test_encoding_only_conditional_frames_is_exact(pipe, cond_frames):
  shape = pipe.latent_shape(FRAMES, SIZE)
  encode_full = jax.jit(lambda p, v: vae_lib.encode_video(pipe.vae_cfg, p, vae_lib.uint8_to_unit_range(v)))
  for n, pad, frames in ((2, "last", cond_frames), (1, "black", cond_frames[:, :1])):
    short = np.asarray(pipe.encode_conditional(frames, shape, n))
    full_clip = conditioning.reference_input_video(frames, FRAMES, SIZE, pad=pad)
    full = np.asarray(encode_full(pipe.vae_params, full_clip[None]))
    assert short.shape == full.shape == shape
    np.testing.assert_allclose(short[:, :, :n], full[:, :, :n], rtol=0, atol=1e-5)
    assert (short[:, :, n:] == 0).all()


def test_conditional_frame_follows_reference_rf(pipe, texts, cond_frames):
  """RF re-imposes conditional frames only via input + velocity replacement, so latent frame 0 ends at
  gt + (1 - sigma_0) (n - gt) (training_spec §3), and the other frames are generated."""
  res = pipe.generate(_req(*texts, cond_frames=cond_frames[:, :1], num_conditional_frames=1))
  shape = pipe.latent_shape(FRAMES, SIZE)
  gt = np.asarray(pipe.encode_conditional(cond_frames[:, :1], shape, 1))[:, :, :1]
  n = np.asarray(guidance_lib.initial_noise(shape, 0))[:, :, :1]
  sigma0 = float(rf_unipc_schedule(STEPS, 5.0).sigmas[0])
  np.testing.assert_allclose(res.latents[:, :, :1], gt + (1 - sigma0) * (n - gt), rtol=0, atol=1e-4)
  free = pipe.generate(_req(*texts)).latents
  assert np.abs(free[:, :, :1] - gt).mean() > 10 * np.abs(res.latents[:, :, :1] - gt).mean()


def test_pt_checkpoint_reproduces_output(tmp_path, pipe, texts, cond_frames):
  path = tmp_path / "dit_ema.pt"
  torch_pt.save(path, convert_dit.params_to_torch(pipe.dit_params, pipe.dit_cfg, lazy=True))
  loaded = weights.load_dit_params(path, pipe.dit_cfg)
  req = _req(*texts, cond_frames=cond_frames, num_conditional_frames=2)
  a = pipe.generate(req)
  b = pipe.generate(req, dit_params=loaded)
  np.testing.assert_array_equal(a.latents, b.latents)
  np.testing.assert_array_equal(a.video, b.video)


def test_bad_requests(pipe, texts):
  text, neg = texts
  with pytest.raises(ValueError, match="not 1 \\+ 4k"):
    pipe.latent_shape(10, SIZE)
  with pytest.raises(ValueError, match="multiples of 16"):
    pipe.latent_shape(9, (24, 48))
  with pytest.raises(ValueError, match="text embedding must be"):
    pipe.generate(_req(text[:, :5]))
  with pytest.raises(ValueError, match="negative text embedding shape"):
    pipe.sample_latents(pipe.latent_shape(FRAMES, SIZE), jnp.asarray(text[None]), jnp.asarray(neg[None, :4]),
                        None, 0, seed=0, guidance=7.0, num_steps=STEPS, shift=5.0)
  with pytest.raises(ValueError, match="no cond_frames"):
    pipe.generate(_req(text, num_conditional_frames=1))
  with pytest.raises(ValueError, match="num_conditional_frames=3"):
    pipe.generate(_req(text, num_conditional_frames=3))


# ---------------------------------------------------------------------------------------------- EDM


@pytest.fixture(scope="module")
def edm_pipe(pipe) -> Video2WorldPipeline:
  config = tiny.get_config()
  config.objective.name = "edm"
  config.model.timestep_scale = 1.0  # what configs/nemo_edm.py sets
  dit_cfg = DiTConfig.from_config(config.model)
  return Video2WorldPipeline(dit_cfg, pipe.vae_cfg, pipe.dit_params, pipe.vae_params,
                             objective=make_objective(config))


def test_edm_pipeline_deterministic_and_conditional_frames_at_gt(edm_pipe, pipe, texts, cond_frames):
  assert isinstance(edm_pipe.sampler(STEPS, 5.0), samplers.EDMSampler)
  req = _req(*texts, cond_frames=cond_frames[:, :1], num_conditional_frames=1)
  res = edm_pipe.generate(req)
  assert res.video.shape == (FRAMES, *SIZE, 3) and np.isfinite(res.latents).all()
  shape = edm_pipe.latent_shape(FRAMES, SIZE)
  gt = edm_pipe.encode_conditional(cond_frames[:, :1], shape, 1)
  text, neg = edm_pipe.text_embedding(texts[0]), edm_pipe.text_embedding(texts[1])
  kw = dict(guidance=7.0, num_steps=STEPS, shift=5.0)
  again = np.asarray(edm_pipe.sample_latents(shape, text, neg, gt, 1, seed=0, **kw))
  np.testing.assert_array_equal(again, res.latents)
  # EDM x0 replacement: the conditional latent frame ends exactly at gt (RF only gets near it).
  gt = np.asarray(gt)
  np.testing.assert_array_equal(res.latents[:, :, :1], gt[:, :, :1])
  assert np.abs(res.latents[:, :, 1:] - gt[:, :, 1:]).mean() > 1e-2
  other_seed = np.asarray(edm_pipe.sample_latents(shape, text, neg, gt, 1, seed=1, **kw))
  assert np.abs(other_seed[:, :, 1:] - res.latents[:, :, 1:]).mean() > 1e-2
  rf = np.asarray(pipe.sample_latents(shape, text, neg, gt, 1, seed=0, **kw))
  assert np.abs(rf - res.latents).mean() > 1e-2  # not the RF sampler


def test_edm_pipeline_matches_sampler_library(edm_pipe, texts):
  """The pipeline's jitted EDM path == generate_latents with EDMSampler on the DiT (c_noise as the
  DiT's timesteps, conditional frames at sigma_conditional), g = 7 with a negative prompt."""
  text, neg = texts
  shape = edm_pipe.latent_shape(FRAMES, SIZE)
  rng = np.random.default_rng(3)
  gt = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  t, u = edm_pipe.text_embedding(text), edm_pipe.text_embedding(neg)
  got = edm_pipe.sample_latents(shape, t, u, gt, 1, seed=0, guidance=7.0, num_steps=STEPS, shift=5.0)
  apply = dit_lib.apply_fn(edm_pipe.dit_cfg)

  def net(x, c_noise, txt, m):
    return apply(edm_pipe.dit_params, x, c_noise, txt, jnp.broadcast_to(m, (x.shape[0], 1) + x.shape[2:]))

  want = samplers.generate_latents(net, shape, text_embeddings=t, uncond_text_embeddings=u, gt_latents=gt,
                                   num_conditional_frames=1, guidance=7.0, seed=0,
                                   sampler=samplers.EDMSampler(num_steps=STEPS))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got)[:, :, :1], np.asarray(gt)[:, :, :1])
