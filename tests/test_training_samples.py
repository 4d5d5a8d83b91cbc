"""The trainer's sample callback (training/samples.SampleWriter) on the tiny config, random weights (CPU).

It samples through the inference pipeline: the written clips match the pipeline's own ``generate`` for the
same request (up to the VAE's causal encoding and mp4 compression), the regular and EMA clips come from
their own parameters, a second call reuses the compiled functions, and the EDM objective samples with the
EDM sampler.
"""

from __future__ import annotations

import pathlib
import types

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import tiny
from v2w_jax.data.video import write_mp4
from v2w_jax.diffusion import samplers
from v2w_jax.inference import weights
from v2w_jax.inference.pipeline import GenerationRequest
from v2w_jax.models import vae as vae_lib
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.parallel.mesh import make_mesh
from v2w_jax.training.samples import SampleWriter

STEPS = 2


class FakeLogger:

  def __init__(self):
    self.videos: list[tuple[int, str, pathlib.Path]] = []

  def log_video(self, step: int, name: str, path: pathlib.Path) -> None:
    self.videos.append((step, name, path))


def _read_mp4(path) -> np.ndarray:
  import av  # pylint: disable=import-outside-toplevel

  with av.open(str(path)) as c:
    return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def _setup(config, tmp_path):
  mesh = make_mesh(config.mesh)
  dit_cfg = DiTConfig.from_config(config.model, logical_axis_rules=tuple(map(tuple, config.mesh.rules)))
  vae_cfg = vae_lib.VAEConfig.from_config(config.vae)
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  model = types.SimpleNamespace(dit_cfg=dit_cfg, vae_cfg=vae_cfg,
                                vae_params=jax.device_put(weights.random_vae_params(vae_cfg, 0), rep))
  state = types.SimpleNamespace(params=jax.device_put(weights.random_dit_params(dit_cfg, 0), rep),
                                ema_params=jax.device_put(weights.random_dit_params(dit_cfg, 1), rep))
  logger = FakeLogger()
  return SampleWriter(config, model, mesh, tmp_path / "job", logger), state, logger


def _batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, t, (h, w) = 2, int(config.data.num_frames), config.data.video_size
  return {"video": rng.integers(0, 256, (b, 3, t, h, w), dtype=np.uint8),
          "text_embeddings": rng.standard_normal((b, 16, config.model.crossattn_proj_in_channels))
                             .astype(ml_dtypes.bfloat16)}


@pytest.fixture(scope="module")
def config():
  c = tiny.get_config()
  c.trainer.sample_num_steps = STEPS
  return c


def test_sample_writer_files_content_and_no_recompile(config, tmp_path):
  writer, state, logger = _setup(config, tmp_path)
  batch = _batch(config)
  step = 40
  paths = writer.write(step, state, batch)
  names = [p.name for p in paths]
  assert names == [f"step_{step:09d}_{n}.mp4" for n in ("reg", "ema", "gt")]
  assert all(p.parent == tmp_path / "job" / "samples" for p in paths)
  assert logger.videos == [(step, "samples/reg", paths[0]), (step, "samples/ema", paths[1])]
  t, (h, w) = int(config.data.num_frames), tuple(config.data.video_size)
  clips = {n: _read_mp4(p) for n, p in zip(("reg", "ema", "gt"), paths)}
  for clip in clips.values():
    assert clip.shape == (t, h, w, 3) and clip.dtype == np.uint8

  # Same request through the pipeline's generate(): first clip, N conditional frames, all-zero negative
  # text, guidance and steps from the config, noise seed = config.seed + step. The mp4 encoder is
  # deterministic, so the same frames give the same file (random-weight clips are noise: lossy by ~16/255).
  pipe = writer.pipeline
  n = int(config.trainer.sample_num_conditional_frames)
  req = GenerationRequest(text_embedding=batch["text_embeddings"][0], negative_text_embedding=None,
                          cond_frames=batch["video"][0], num_conditional_frames=n, num_frames=t, size=(h, w),
                          seed=int(config.seed) + step, guidance=float(config.trainer.sample_guidance),
                          num_steps=STEPS)

  def via_mp4(frames):
    write_mp4(tmp_path / "want.mp4", np.asarray(frames))
    return _read_mp4(tmp_path / "want.mp4")

  for name, params in (("reg", state.params), ("ema", state.ema_params)):
    want = via_mp4(pipe.generate(req, dit_params=params).video)
    np.testing.assert_array_equal(clips[name], want, err_msg=name)
  assert np.abs(clips["reg"].astype(np.int32) - clips["ema"]).mean() > 10
  shape = pipe.latent_shape(t, (h, w))
  np.testing.assert_array_equal(clips["gt"], via_mp4(pipe.decode(pipe.encode_conditional(batch["video"][0], shape,
                                                                                         shape[2]))))

  # A second call (new step, new batch) reuses every compiled function.
  sample_fn = pipe.sample_fn(STEPS, 5.0, True)
  sizes = (sample_fn._cache_size(), pipe._decode._cache_size())  # pylint: disable=protected-access
  paths2 = writer.write(step + 40, state, _batch(config, seed=1))
  assert [p.name for p in paths2] == [f"step_{step + 40:09d}_{n}.mp4" for n in ("reg", "ema", "gt")]
  assert (sample_fn._cache_size(), pipe._decode._cache_size()) == sizes == (1, 1)  # pylint: disable=protected-access


def test_sample_writer_disabled_and_edm(tmp_path):
  c = tiny.get_config()
  c.trainer.sample_iter = 0
  writer, state, _ = _setup(c, tmp_path)
  assert writer.write(1, state, _batch(c)) == [] and writer.pipeline is None
  c = tiny.get_config()
  c.objective.name = "edm"
  c.model.timestep_scale = 1.0
  writer, _, _ = _setup(c, tmp_path)
  assert writer.pipeline.sampler(int(c.trainer.sample_num_steps), 5.0) == samplers.EDMSampler(
      num_steps=int(c.trainer.sample_num_steps))
