"""Parity of the Flax Wan2.1 VAE against the PyTorch reference goldens (fixtures/wan_vae_tiny).

Every size comes from the fixture folder (config.json, array shapes), so any folder with the same
layout must pass. Tolerances are the fixture README's suggestions for a float32 port.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from conftest import VAEFixture
from v2w_jax.models import vae as vae_lib

LATENT_ATOL, LATENT_RTOL = 1e-4, 1e-4
DECODED_ATOL = 5e-4


@pytest.fixture(scope="module")
def fx(wan_vae_tiny: VAEFixture) -> VAEFixture:
  return wan_vae_tiny


@functools.cache
def _encode_fn(cfg: vae_lib.VAEConfig):
  def f(p, x):
    return vae_lib.encode_moments(cfg, p, x), vae_lib.encode_video(cfg, p, x)
  return jax.jit(f)


def test_encode_matches_reference(fx: VAEFixture):
  assert fx.cases, "fixture config.json lists no cases"
  with jax.default_matmul_precision("highest"):
    for case in fx.cases:
      video = fx.inputs[f"{case}/video"]
      moments, latent = map(np.asarray, _encode_fn(fx.cfg)(fx.params, video))
      ref = fx.outputs[f"{case}/latent"]
      assert latent.shape == ref.shape, case
      assert latent.dtype == np.float32
      np.testing.assert_allclose(moments, fx.outputs[f"{case}/enc_moments"], atol=LATENT_ATOL,
                                 rtol=LATENT_RTOL, err_msg=f"{case}: enc_moments")
      np.testing.assert_allclose(latent, ref, atol=LATENT_ATOL, rtol=LATENT_RTOL,
                                 err_msg=f"{case}: latent")
      np.testing.assert_allclose(latent, fx.outputs[f"{case}/latent_f64"], atol=LATENT_ATOL,
                                 rtol=LATENT_RTOL, err_msg=f"{case}: latent vs f64")


def test_decode_matches_reference(fx: VAEFixture):
  decode = jax.jit(functools.partial(vae_lib.decode_latents, fx.cfg))
  with jax.default_matmul_precision("highest"):
    for case in fx.cases:
      video = np.asarray(decode(fx.params, fx.outputs[f"{case}/latent"]))
      ref = fx.outputs[f"{case}/decoded"]
      assert video.shape == ref.shape == fx.inputs[f"{case}/video"].shape, case
      np.testing.assert_allclose(video, ref, atol=DECODED_ATOL, rtol=0, err_msg=f"{case}: decoded")
      np.testing.assert_allclose(video, fx.outputs[f"{case}/decoded_f64"], atol=DECODED_ATOL, rtol=0,
                                 err_msg=f"{case}: decoded vs f64")
