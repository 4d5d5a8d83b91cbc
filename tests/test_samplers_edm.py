"""EDM 2ab sampler vs the reference fixtures (samplers/edm_sampler.npz) and spec §12 item 25."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from v2w_jax.diffusion import samplers
from v2w_jax.diffusion.edm_sampler import edm_2ab_coefficients, edm_2ab_update, edm_sample
from v2w_jax.diffusion.guidance import conditional_frame_mask
from v2w_jax.diffusion.timesteps import edm_karras_sigmas, karras_sigmas

RUNS = ("s35", "s10", "gauss")
TRAJ_ATOL = 1e-4  # README §3: final sample and trajectory, float32 or float64 state
TF_ATOL = 1e-9  # README §3: teacher-forced 2ab updates in float64


@pytest.fixture(scope="module")
def edm(load_fixture_npz):
  return load_fixture_npz("samplers/edm_sampler.npz")


def _run(edm, name):
  prefix = name + "_"
  return {k[len(prefix):]: v for k, v in edm.items() if k.startswith(prefix)}


def _sigmas(r):
  return edm_karras_sigmas(int(r["num_steps"]), float(r["sigma_max"]), float(r["sigma_min"]))


def test_sigma_tables(edm):
  tables = [k for k in edm if k.startswith("table_")]
  assert tables
  for t in tables:
    _, smax, smin, n = t.split("_")
    s = karras_sigmas(float(smax.replace("p", ".")), float(smin.replace("p", ".")), int(n))
    np.testing.assert_allclose(s, edm[t], rtol=1e-14, atol=0, err_msg=t)
  for name in RUNS:
    r = _run(edm, name)
    np.testing.assert_allclose(_sigmas(r), r["sigmas"], rtol=1e-14, atol=0)


def test_spec_item25_karras_lists():
  s = karras_sigmas(200.0, 0.01, 35)
  assert s.shape == (36,)
  np.testing.assert_allclose(s[:3], [200.0, 171.614659, 146.754903], rtol=1e-8)
  np.testing.assert_allclose(s[-3:], [0.031485, 0.018165, 0.01], rtol=2e-5)
  d = edm_karras_sigmas(35)
  np.testing.assert_allclose(d[[0, 1, -2, -1]], [80.0, 67.46751437031429, 0.0005379397550535893, 0.0002],
                             rtol=1e-13)


@pytest.mark.parametrize("name", RUNS)
def test_teacher_forced_2ab_float64(edm, name):
  r = _run(edm, name)
  c = edm_2ab_coefficients(r["sigmas"])
  with jax.enable_x64(True):
    step = jax.jit(edm_2ab_update)
    for i in range(r["x0pred"].shape[0]):
      prev = r["x0pred"][i - 1] if i >= 1 else np.zeros_like(r["x0pred"][0])
      x_next = step(jnp.asarray(r["x"][i]), jnp.asarray(r["x0pred"][i]), jnp.asarray(prev), c.a[i], c.b[i],
                    c.c[i])
      assert x_next.dtype == jnp.float64
      np.testing.assert_allclose(x_next, r["x"][i + 1], atol=TF_ATOL, rtol=0, err_msg=f"{name} step {i}")


def make_toy_x0_net(edm, use_coupling: bool, sigma_data: float):
  """The fixture's analytic denoiser (README §3), EDM scaling: D_w(x, s) = mu_w + s_w^2/(s_w^2+s^2)(x - mu_w)
  + s^2/(s^2+1)(A_w x_in + kappa_w x_in[:, :, 0]) with x_in the net input (c_in x, conditional frames = the clean
  latent gt/sigma_data). Prompt w told apart by the text mean (cond = ones)."""
  def params(w):
    return dict(mu=jnp.asarray(edm[f"toy_mu_{w}"], jnp.float32), s=jnp.asarray(edm[f"toy_s_{w}"], jnp.float32),
                A=jnp.asarray(edm[f"toy_A_{w}"], jnp.float32), kappa=jnp.float32(edm[f"toy_kappa_{w}"]))

  pc, pu = params("c"), params("u")

  def make(gt):
    def branch(p, x, x_in, s):
      s2 = (p["s"] ** 2)[:, None, None, None]
      d = p["mu"] + s2 / (s2 + s * s) * (x - p["mu"])
      if use_coupling:
        d = d + s * s / (s * s + 1) * (jnp.einsum("ij,bjthw->bithw", p["A"], x_in) + p["kappa"] * x_in[:, :, :1])
      return d

    def net(x, sigma_b_1, text, cond_mask):
      s = sigma_b_1[:, :, None, None, None]
      c_in = 1.0 / jnp.sqrt(s * s + sigma_data ** 2)
      x_in = (gt / sigma_data) * cond_mask + c_in * x * (1 - cond_mask)
      is_c = (jnp.mean(text, axis=tuple(range(1, text.ndim))) > 0.5)[:, None, None, None, None]
      return jnp.where(is_c, branch(pc, x, x_in, s), branch(pu, x, x_in, s))

    return net

  return make


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("x64", [False, True])
def test_full_loop_with_toy_net(edm, name, x64):
  r = _run(edm, name)
  assert str(r["scaling"]) == "edm"
  sd = float(r["sigma_data"])
  np.testing.assert_array_equal(r["gt_latent"], (sd * r["video"]).astype(np.float32))
  n_cond = int(r["num_cond_frames"])
  t = r["noise"].shape[1]
  np.testing.assert_array_equal(r["cond_mask_T"], (np.arange(t) < n_cond).astype(np.float32))
  gt = jnp.asarray(r["gt_latent"])[None]
  net = make_toy_x0_net(edm, bool(r["use_coupling"]), sd)(gt)
  with jax.enable_x64(x64):
    final, traj = samplers.sample_edm(
        net, jnp.asarray(r["noise"])[None], r["sigmas"], text_embeddings=jnp.ones((1, 3, 8)),
        uncond_text_embeddings=jnp.zeros((1, 3, 8)), gt_latents=gt, cond_mask=conditional_frame_mask(n_cond, 1, t),
        guidance=float(r["guidance"]), state_dtype=jnp.float64 if x64 else jnp.float32, return_trajectory=True)
    assert traj.x.dtype == (jnp.float64 if x64 else jnp.float32) and final.dtype == jnp.float32
    np.testing.assert_allclose(traj.x[0, 0], r["x_init"], atol=TRAJ_ATOL, rtol=0)
    np.testing.assert_allclose(traj.x[:, 0], r["x"], atol=TRAJ_ATOL, rtol=0)
    np.testing.assert_allclose(traj.x0pred[:, 0], r["x0pred"], atol=TRAJ_ATOL, rtol=0)
    np.testing.assert_allclose(final[0], r["final"], atol=TRAJ_ATOL, rtol=0)
    np.testing.assert_array_equal(final[0, :, :n_cond], r["gt_latent"][:, :n_cond])  # x0 replacement


def test_gauss_close_to_closed_form(edm):
  r = _run(edm, "gauss")
  net = make_toy_x0_net(edm, False, float(r["sigma_data"]))(jnp.zeros((1,) + r["noise"].shape))
  out = samplers.generate_latents_edm(
      net, (1,) + r["noise"].shape, text_embeddings=jnp.ones((1, 2)), guidance=0.0, seed=int(r["seed"]),
      num_steps=int(r["num_steps"]), sigma_max=float(r["sigma_max"]), sigma_min=float(r["sigma_min"]))
  np.testing.assert_allclose(out[0], r["final"], atol=TRAJ_ATOL, rtol=0)
  assert np.abs(np.asarray(out[0], np.float64) - edm["gauss_analytic"]).max() < 0.06  # README: 0.0481


def test_edm_sample_bad_grid():
  with pytest.raises(ValueError, match="differ"):
    edm_sample(lambda x, s: x, jnp.ones((1, 2)), np.array([2.0, 2.0, 1.0]))
