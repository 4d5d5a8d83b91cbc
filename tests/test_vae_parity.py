"""Parity of the Flax Wan2.1 VAE against the PyTorch reference goldens (fixtures/wan_vae_tiny).

Every size comes from the fixture folder (config.json, array shapes), so any folder with the same
layout must pass. Tolerances are the fixture README's suggestions for a float32 port.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import numpy as np
import pytest

from v2w_jax.convert import torch_pt
from v2w_jax.convert import vae as convert_vae
from v2w_jax.models import vae as vae_lib

LATENT_ATOL, LATENT_RTOL = 1e-4, 1e-4
DECODED_ATOL = 5e-4


@dataclasses.dataclass
class Fixture:
  cfg: vae_lib.VAEConfig
  config: dict
  params: dict
  inputs: dict
  outputs: dict

  @property
  def cases(self) -> list[str]:
    return list(self.config["cases"])


@pytest.fixture(scope="module")
def fx(fixtures_dir: pathlib.Path) -> Fixture:
  d = fixtures_dir / "wan_vae_tiny"
  with open(d / "config.json") as f:
    config = json.load(f)
  cfg = vae_lib.VAEConfig.from_fixture(config)
  params = convert_vae.torch_to_params(torch_pt.load(d / "weights.pt"), cfg)
  with np.load(d / "inputs.npz") as z:
    inputs = dict(z)
  with np.load(d / "outputs.npz") as z:
    outputs = dict(z)
  return Fixture(cfg, config, params, inputs, outputs)


@functools.cache
def _encode_fn(cfg: vae_lib.VAEConfig):
  def f(p, x):
    return vae_lib.encode_moments(cfg, p, x), vae_lib.encode_video(cfg, p, x)
  return jax.jit(f)


def test_encode_matches_reference(fx: Fixture):
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


def test_decode_matches_reference(fx: Fixture):
  decode = jax.jit(functools.partial(vae_lib.decode_latents, fx.cfg))
  with jax.default_matmul_precision("highest"):
    for case in fx.cases:
      video = np.asarray(decode(fx.params, fx.outputs[f"{case}/latent"]))
      ref = fx.outputs[f"{case}/decoded"]
      assert video.shape == ref.shape == fx.inputs[f"{case}/video"].shape, case
      np.testing.assert_allclose(video, ref, atol=DECODED_ATOL, rtol=0, err_msg=f"{case}: decoded")
      np.testing.assert_allclose(video, fx.outputs[f"{case}/decoded_f64"], atol=DECODED_ATOL, rtol=0,
                                 err_msg=f"{case}: decoded vs f64")
