"""EDM 2ab sampler vs the reference fixtures (samplers/edm_sampler.npz) and spec §12 item 25.

Runs, their settings and the closed-form distance come from the fixture (npz keys, metrics.json), so any
samplers folder of the same layout must pass.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import closed_form_run, fixture_npz_keys, run_arrays, sampler_runs
from v2w_jax.diffusion import edm as edm_lib
from v2w_jax.diffusion import guidance as guidance_lib
from v2w_jax.diffusion import samplers
from v2w_jax.diffusion.edm_sampler import edm_2ab_coefficients, edm_2ab_update, edm_sample
from v2w_jax.diffusion.guidance import conditional_frame_mask
from v2w_jax.diffusion.objective import make_objective
from v2w_jax.diffusion.timesteps import edm_karras_sigmas, karras_sigmas

RUNS = sampler_runs(fixture_npz_keys("samplers/edm_sampler.npz"))
TRAJ_ATOL = 1e-4  # README §3: final sample and trajectory, float32 or float64 state
TF_ATOL = 1e-9  # README §3: teacher-forced 2ab updates in float64


@pytest.fixture(scope="module")
def edm(load_fixture_npz):
  return load_fixture_npz("samplers/edm_sampler.npz")


def test_fixture_has_runs(edm):
  assert RUNS and RUNS == sampler_runs(edm), "edm_sampler.npz holds no <run>_guidance settings"


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
    r = run_arrays(edm, name)
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
  r = run_arrays(edm, name)
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
  r = run_arrays(edm, name)
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


def test_gauss_close_to_closed_form(edm, load_fixture_json):
  if "gauss_analytic" not in edm:
    pytest.skip("edm_sampler.npz has no closed-form endpoint (gauss_analytic)")
  name = closed_form_run(edm)
  r = run_arrays(edm, name)
  net = make_toy_x0_net(edm, False, float(r["sigma_data"]))(jnp.zeros((1,) + r["noise"].shape))
  noise = guidance_lib.initial_noise((1,) + r["noise"].shape, int(r["seed"]))
  out = jax.jit(lambda n: samplers.sample_edm(
      net, n, _sigmas(r), text_embeddings=jnp.ones((1, 2)), uncond_text_embeddings=None, gt_latents=None,
      cond_mask=conditional_frame_mask(0, 1, n.shape[2]), guidance=0.0))(noise)
  np.testing.assert_allclose(out[0], r["final"], atol=TRAJ_ATOL, rtol=0)
  # The reference's own distance to the exact ODE endpoint, plus our float32 distance to the reference.
  ref_distance = load_fixture_json("samplers/metrics.json")["edm_sampler"][name]["max_abs_final_vs_analytic"]
  assert np.abs(np.asarray(out[0], np.float64) - edm["gauss_analytic"]).max() <= ref_distance + TRAJ_ATOL


def make_toy_raw_net(edm, use_coupling: bool, sigma_data: float):
  """The fixture's toy as a raw network F (README §3: c_skip x + c_out F equals the toy x0 predictor): it
  recovers sigma from the c_noise of the last (noisy) frame, x from its input c_in x, and reads the coupling
  term off its input directly (conditional frames there: gt / sigma_data). EDM scaling only."""
  toy = make_toy_x0_net(edm, use_coupling, sigma_data)

  def net(net_in, c_noise_b_t, text, cond_mask):
    sigma = jnp.exp(4.0 * c_noise_b_t[:, -1:])  # c_noise = ln(sigma) / 4
    c_skip, c_out, c_in, _ = edm_lib.edm_scaling(sigma[:, :, None, None, None], sigma_data)
    x = net_in / c_in
    # The toy's own input replacement gets the clean frames back from net_in (= gt / sigma_data there).
    d = toy(net_in * sigma_data)(x, sigma, text, cond_mask)
    return (d - c_skip * x) / c_out

  return net


@pytest.mark.parametrize("name", RUNS)
def test_edm_sampler_on_raw_net(edm, name):
  """The model path: EDMSampler = edm_denoiser preconditioning + sigma_data latent scaling + 2ab, on the raw
  toy F, reproduces the reference final sample; conditional frames end exactly at gt."""
  r = run_arrays(edm, name)
  sd = float(r["sigma_data"])
  n_cond = int(r["num_cond_frames"])
  sampler = samplers.EDMSampler(num_steps=int(r["num_steps"]), sigma_max=float(r["sigma_max"]),
                                sigma_min=float(r["sigma_min"]), sigma_data=sd)
  assert samplers.make_sampler(make_objective(_edm_config(r)), int(r["num_steps"])) == sampler
  net = make_toy_raw_net(edm, bool(r["use_coupling"]), sd)
  gt_normalised = jnp.asarray(r["video"], jnp.float32)[None]  # the toy VAE is the identity
  out = samplers.generate_latents(
      net, (1,) + r["noise"].shape, text_embeddings=jnp.ones((1, 3, 8)), uncond_text_embeddings=jnp.zeros((1, 3, 8)),
      gt_latents=gt_normalised, num_conditional_frames=n_cond, guidance=float(r["guidance"]), sampler=sampler,
      noise=jnp.asarray(r["noise"])[None])
  np.testing.assert_allclose(out[0] * sd, r["final"], atol=TRAJ_ATOL, rtol=0)
  np.testing.assert_array_equal(out[0, :, :n_cond], gt_normalised[0, :, :n_cond])


def _edm_config(r):
  from configs import nemo_edm  # pylint: disable=import-outside-toplevel

  c = nemo_edm.get_config()
  c.objective.edm.update(sigma_max=float(r["sigma_max"]), sigma_min=float(r["sigma_min"]),
                         sigma_data=float(r["sigma_data"]))
  return c


def test_edm_denoiser_matches_training_loss():
  """edm_denoiser is the preconditioning of edm.edm_loss: the loss rebuilt from it equals edm_loss."""
  rng = np.random.default_rng(0)
  b, c, t, h, w = 2, 3, 4, 2, 3
  x0 = jnp.asarray(rng.standard_normal((b, c, t, h, w)), jnp.float32) * 0.5
  eps = jnp.asarray(rng.standard_normal((b, c, t, h, w)), jnp.float32)
  sigma = jnp.asarray([0.3, 7.0], jnp.float32)
  frame_mask = jnp.asarray([[1, 0, 0, 0], [1, 1, 0, 0]], jnp.float32)
  w_mix = jnp.asarray(rng.standard_normal((c, c)), jnp.float32)

  def raw(net_in, c_noise_b_t):  # any nonlinear function of the input and the per-frame c_noise
    return jnp.tanh(jnp.einsum("ij,bjthw->bithw", w_mix, net_in) + c_noise_b_t[:, None, :, None, None])

  for scaling in ("edm", "rectified_flow"):
    sd = 0.5 if scaling == "edm" else 1.0
    loss, _ = edm_lib.edm_loss(raw, x0, eps, sigma, frame_mask, sigma_data=sd, scaling=scaling,
                               net_dtype=jnp.float32, loss_reduce="mean")
    denoise = samplers.edm_denoiser(lambda x, cn, text, m: raw(x, cn), sigma_data=sd, scaling=scaling)
    mask = frame_mask[:, None, :, None, None]
    x_in = guidance_lib.impose_input_frames(x0 + sigma[:, None, None, None, None] * eps, x0, mask)
    x0_pred = guidance_lib.impose_x0_frames(denoise(x_in, sigma[:, None], None, mask), x0, mask)
    want = 10.0 * jnp.mean(edm_lib.loss_weight(sigma[:, None, None, None, None], scaling, sd) * (x0 - x0_pred) ** 2)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)


def test_edm_sample_bad_grid():
  with pytest.raises(ValueError, match="differ"):
    edm_sample(lambda x, s: x, jnp.ones((1, 2)), np.array([2.0, 2.0, 1.0]))
