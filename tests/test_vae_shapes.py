"""Wan2.1 VAE: full-size parameter layout vs the released state dict, converter strictness, input
checks, shapes, and that encode/decode are a scan (program size independent of clip length)."""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.extend
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from v2w_jax.convert import vae as convert_vae
from v2w_jax.models import vae as vae_lib

TINY = vae_lib.VAEConfig(base_dim=4, dtype="float32")


def _read_keys(path: pathlib.Path) -> tuple[dict[str, tuple[int, ...]], int | None]:
  keys: dict[str, tuple[int, ...]] = {}
  total = None
  for line in path.read_text().splitlines():
    if line.startswith("#"):
      m = re.search(r"(\d+) parameters", line)
      total = int(m.group(1)) if m else total
      continue
    if line.strip():
      name, shape, _ = line.split()
      keys[name] = tuple(int(s) for s in shape.split("x"))
  return keys, total


def test_full_size_params_match_released_state_dict(reference_file):
  want, total = _read_keys(reference_file("wan_vae_keys.txt"))
  cfg = vae_lib.VAEConfig()  # released: base_dim 96, z_dim 16
  got = convert_vae.params_to_torch(vae_lib.abstract_params(cfg), cfg)
  assert list(got) == list(want), "key set or order differs"
  bad = {k: (tuple(v.shape), want[k]) for k, v in got.items() if tuple(v.shape) != want[k]}
  assert not bad, bad
  n = sum(int(np.prod(s)) for s in want.values())
  if total is not None:
    assert n == total


def _random_state_dict(cfg: vae_lib.VAEConfig, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {k: rng.standard_normal(s).astype(np.float32)
          for k, s in convert_vae.expected_torch_shapes(cfg).items()}


def test_converter_round_trip_and_layouts():
  sd = _random_state_dict(TINY)
  params = convert_vae.torch_to_params(sd, TINY)
  abstract = vae_lib.abstract_params(TINY)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), params, abstract)
  back = convert_vae.params_to_torch(params, TINY)
  assert list(back) == list(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  # Spot-check the layout rules independently of the converter's tables.
  w = sd["encoder.conv1.weight"]  # [O, I, kT, kH, kW]
  np.testing.assert_array_equal(params["encoder"]["conv1"]["kernel"], w.transpose(2, 3, 4, 1, 0))
  w = sd["encoder.downsamples.2.resample.1.weight"]  # [O, I, 3, 3]
  np.testing.assert_array_equal(params["encoder"]["downsamples_2"]["conv"]["kernel"],
                                w.transpose(2, 3, 1, 0))
  w = sd["decoder.middle.1.to_qkv.weight"]  # [3C, C, 1, 1]
  np.testing.assert_array_equal(params["decoder"]["middle_1"]["to_qkv"]["kernel"], w[:, :, 0, 0].T)
  g = sd["decoder.middle.1.norm.gamma"]
  np.testing.assert_array_equal(params["decoder"]["middle_1"]["norm"]["scale"], g.reshape(-1))


def test_converter_reports_all_problems_at_once():
  sd = _random_state_dict(TINY)
  del sd["decoder.head.2.bias"]
  sd["encoder.bogus.weight"] = np.zeros(3, np.float32)
  sd["conv2.weight"] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(ValueError) as e:
    convert_vae.torch_to_params(sd, TINY)
  msg = str(e.value)
  for part in ("decoder.head.2.bias", "encoder.bogus.weight", "conv2.weight", "missing", "unknown",
               "mis-shaped"):
    assert part in msg, (part, msg)
  # Wrong width (a dim-96 checkpoint into a dim-4 model) is a shape error, not a crash.
  params = convert_vae.torch_to_params(_random_state_dict(TINY), TINY)
  params["encoder"].pop("conv1")
  params["extra"] = {"kernel": np.zeros(1)}
  with pytest.raises(ValueError, match=r"(?s)missing.*encoder/conv1/kernel.*unknown.*extra/kernel"):
    convert_vae.params_to_torch(params, TINY)


@pytest.mark.parametrize(
    "shape, dtype, pattern",
    [
        ((1, 3, 10, 32, 48), np.float32, r"T=10 frames is not 1\+4k \(valid nearby: 9 or 13\)"),
        ((1, 3, 9, 36, 48), np.float32, r"H=36 is not a positive multiple of 8"),
        ((1, 3, 9, 32, 4), np.float32, r"W=4 is not a positive multiple of 8"),
        ((1, 4, 9, 32, 48), np.float32, r"\[B, 3, T, H, W\]"),
        ((3, 9, 32, 48), np.float32, r"\[B, 3, T, H, W\]"),
        ((1, 3, 9, 32, 48), np.uint8, r"floating point"),
    ],
)
def test_encode_input_checks(shape, dtype, pattern):
  vae = vae_lib.WanVAE(TINY)
  with pytest.raises(ValueError, match=pattern):
    vae.encode(vae_lib.abstract_params(TINY), np.zeros(shape, dtype))


def test_encode_reports_every_shape_problem():
  with pytest.raises(ValueError, match=r"(?s)T=4 frames.*H=20.*W=30"):
    vae_lib.check_video(np.zeros((1, 3, 4, 20, 30), np.float32), TINY)


@pytest.mark.parametrize("shape", [(1, 8, 2, 4, 6), (16, 2, 4, 6), (1, 16, 0, 4, 6)])
def test_decode_input_checks(shape):
  with pytest.raises(ValueError, match=r"latents must be \[B, 16, t, h, w\]"):
    vae_lib.WanVAE(TINY).decode(vae_lib.abstract_params(TINY), np.zeros(shape, np.float32))


def test_full_size_output_shapes():
  """93x704x1280 <-> 24x88x160 (Video2World 720p); traced only, nothing runs."""
  cfg = vae_lib.VAEConfig()
  params = vae_lib.abstract_params(cfg)
  video = jax.ShapeDtypeStruct((1, 3, 93, 704, 1280), jnp.bfloat16)
  lat = jax.eval_shape(functools.partial(vae_lib.encode_video, cfg), params, video)
  assert lat.shape == (1, 16, 24, 88, 160) and lat.dtype == jnp.float32
  out = jax.eval_shape(functools.partial(vae_lib.decode_latents, cfg), params, lat)
  assert out.shape == (1, 3, 93, 704, 1280) and out.dtype == jnp.float32
  assert vae_lib.WanVAE(cfg).latent_shape((2, 3, 29, 480, 832)) == (2, 16, 8, 60, 104)


def _count_eqns(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += 1
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      n += _count_eqns(sub)
  return n


def _program(fn, cfg, shape):
  jaxpr = jax.make_jaxpr(functools.partial(fn, cfg))(vae_lib.abstract_params(cfg),
                                                     jax.ShapeDtypeStruct(shape, jnp.float32))
  return _count_eqns(jaxpr.jaxpr), str(jaxpr).count("scan[")


def test_longer_clips_do_not_grow_the_program():
  """Encode T=9 vs 17 and decode t=3 vs 5 trace to the same number of equations (a scan)."""
  e9, s9 = _program(vae_lib.encode_video, TINY, (1, 3, 9, 16, 16))
  e17, s17 = _program(vae_lib.encode_video, TINY, (1, 3, 17, 16, 16))
  assert e9 == e17 and s9 == s17 == 1
  d3, s3 = _program(vae_lib.decode_latents, TINY, (1, 16, 3, 2, 2))
  d5, s5 = _program(vae_lib.decode_latents, TINY, (1, 16, 5, 2, 2))
  assert d3 == d5 and s3 == s5 == 1


def test_latent_constants_are_cosmos_bf16_values():
  """Cosmos holds mean/std in bf16 and computes 1/std in bf16 (vae_spec.md §6 lists the results)."""
  mean, inv_std = vae_lib.latent_constants(vae_lib.VAEConfig())
  np.testing.assert_array_equal(mean[:4], [-0.7578125, -0.70703125, -0.91015625, 0.107421875])
  np.testing.assert_array_equal(inv_std[:4], [0.35546875, 0.6875, 0.4296875, 0.376953125])
  np.testing.assert_array_equal(inv_std, inv_std.astype(ml_dtypes.bfloat16).astype(np.float32))
  mean32, inv32 = vae_lib.latent_constants(vae_lib.VAEConfig(latent_constants_dtype="float32"))
  np.testing.assert_allclose(1 / inv32, vae_lib.LATENT_STD, rtol=1e-6)


def test_config_from_project_configs():
  from configs import nemo, tiny  # pylint: disable=import-outside-toplevel
  cfg = vae_lib.VAEConfig.from_config(nemo.get_config().vae)
  assert (cfg.base_dim, cfg.z_dim, cfg.dtype, cfg.temporal_window) == (96, 16, "bfloat16", 16)
  assert vae_lib.VAEConfig.from_config(tiny.get_config().vae).base_dim == 8
  with pytest.raises(ValueError, match="encode_chunk"):
    vae_lib.VAEConfig(encode_chunk=6)


def test_uint8_to_unit_range_rounds_like_cosmos():
  x = vae_lib.uint8_to_unit_range(np.array([0, 127, 128, 200, 255], np.uint8))
  assert x.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(x, np.float32),
                                [-1.0, -0.00390625, 0.0078125, 0.5703125, 1.0])
