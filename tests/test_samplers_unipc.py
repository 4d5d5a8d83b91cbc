"""Rectified-flow UniPC sampler vs the reference fixtures (samplers/rf_unipc.npz) and spec §12 items 22-24.

Runs, their settings and the closed-form distance come from the fixture (npz keys, metrics.json), so any
samplers folder of the same layout must pass.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import closed_form_run, fixture_npz_keys, pick_run, run_arrays, sampler_runs
from v2w_jax.diffusion import samplers
from v2w_jax.diffusion.guidance import conditional_frame_mask
from v2w_jax.diffusion.timesteps import RFSchedule, rf_unipc_schedule
from v2w_jax.diffusion.unipc import (UniPCCoefficients, UniPCState, unipc_coefficients, unipc_sample,
                                     unipc_update)

RUNS = sampler_runs(fixture_npz_keys("samplers/rf_unipc.npz"))
TRAJ_ATOL = 1e-4  # README §1: trajectories / final sample of a float32 port
STEP_ATOL = 1e-5  # README §1: teacher-forced single steps


@pytest.fixture(scope="module")
def rf(load_fixture_npz):
  return load_fixture_npz("samplers/rf_unipc.npz")


def _coupled_run(rf, **extra) -> str:
  """A run whose toy net couples to the conditional input frame (needs >= 1 conditional frame)."""
  return pick_run(rf, "with conditional frames and the coupling on",
                  lambda r: int(r["num_cond_frames"]) >= 1 and bool(r["use_coupling"]), **extra)


def test_fixture_has_runs(rf):
  assert RUNS and RUNS == sampler_runs(rf), "rf_unipc.npz holds no <run>_guidance settings"


def _schedule(r) -> RFSchedule:
  return rf_unipc_schedule(int(r["num_steps"]), float(r["shift"]), use_karras_sigmas=bool(r["karras"]))


# ----------------------------------------------------------------------------- schedules


def test_schedule_tables_bit_exact(rf):
  tables = sorted({k.rsplit("_", 1)[0] for k in rf if k.startswith("table_")})
  assert tables, "no table_* entries in rf_unipc.npz"
  for t in tables:
    _, kind, n = t.split("_")
    if kind == "karras":
      s = rf_unipc_schedule(int(n), use_karras_sigmas=True)
    else:
      s = rf_unipc_schedule(int(n), float(kind.removeprefix("shift").replace("p", ".")))
    np.testing.assert_array_equal(s.timesteps, rf[t + "_timesteps"], err_msg=t)
    assert s.sigmas.dtype == np.float32
    np.testing.assert_array_equal(s.sigmas.view(np.uint32), rf[t + "_sigmas"].view(np.uint32), err_msg=t)


@pytest.mark.parametrize("name", RUNS)
def test_run_schedule_and_orders(rf, name):
  r = run_arrays(rf, name)
  s = _schedule(r)
  np.testing.assert_array_equal(s.timesteps, r["timesteps"])
  np.testing.assert_array_equal(s.sigmas, r["sigmas"])
  np.testing.assert_array_equal(unipc_coefficients(s.sigmas).order, r["order"])


def test_spec_item22_timesteps_and_sigmas():
  s = rf_unipc_schedule(35, 5.0)
  assert s.timesteps.tolist() == [
      999, 993, 987, 981, 974, 967, 960, 952, 943, 935, 925, 915, 905, 894, 882, 869, 855, 840, 824, 807, 789,
      768, 746, 722, 695, 666, 633, 596, 555, 508, 454, 391, 318, 232, 128]
  np.testing.assert_allclose(s.sigmas[:3], [0.9998, 0.993948, 0.987817], atol=1e-6)
  np.testing.assert_allclose(s.sigmas[-3:], [0.232369, 0.12809, 0.0], atol=1e-6)
  k = rf_unipc_schedule(35, use_karras_sigmas=True)
  assert k.num_evaluations == 36 and k.sigmas.shape == (37,)
  assert k.timesteps[:2].tolist() == [995, 994] and k.timesteps[-2:].tolist() == [17, 9]


# ----------------------------------------------------------------------------- solver


@pytest.mark.parametrize("name", RUNS)
def test_teacher_forced_steps(rf, name):
  """Feed the reference state and guided velocity at every step; compare m_k, corrected x_k and x_{k+1}."""
  r = run_arrays(rf, name)
  c = unipc_coefficients(r["sigmas"])
  c = UniPCCoefficients(*[jnp.asarray(a) if a.dtype.kind in "bi" else jnp.asarray(a, jnp.float32) for a in c])
  zero = np.zeros_like(r["x"][0])
  step = jax.jit(unipc_update)
  for k in range(r["timesteps"].shape[0]):
    state = UniPCState(
        x=jnp.asarray(r["x"][k]),
        last_sample=jnp.asarray(r["x_corrected"][k - 1] if k >= 1 else zero),
        m_prev=jnp.asarray(r["x0pred"][k - 1] if k >= 1 else zero),
        m_prev2=jnp.asarray(r["x0pred"][k - 2] if k >= 2 else zero))
    new, (m, x_corr) = step(state, jnp.asarray(r["v"][k]), jax.tree.map(lambda a: a[k], c))
    np.testing.assert_allclose(m, r["x0pred"][k], atol=STEP_ATOL, rtol=0, err_msg=f"{name} x0pred[{k}]")
    np.testing.assert_allclose(x_corr, r["x_corrected"][k], atol=STEP_ATOL, rtol=0, err_msg=f"{name} corr[{k}]")
    np.testing.assert_allclose(new.x, r["x"][k + 1], atol=STEP_ATOL, rtol=0, err_msg=f"{name} x[{k + 1}]")


def _toy_params(rf, w):
  return dict(mu=jnp.asarray(rf[f"toy_mu_{w}"], jnp.float32), s=jnp.asarray(rf[f"toy_s_{w}"], jnp.float32),
              A=jnp.asarray(rf[f"toy_A_{w}"], jnp.float32), kappa=jnp.float32(rf[f"toy_kappa_{w}"]))


def make_toy_velocity_net(rf, use_coupling: bool):
  """The fixture's analytic 'net' (README §1): exact flow velocity of a per-element Gaussian N(mu_w, s_w^2)
  + A_w x_in + kappa_w x_in[:, :, 0]; the prompt w (cond = ones, uncond = zeros) is told apart by the text mean.
  Takes [B, C, T, H, W] inputs and the net's timesteps (0..1000, (B, 1) or (B, T)); calls are counted."""
  pc, pu = _toy_params(rf, "c"), _toy_params(rf, "u")
  calls = []

  def branch(p, x_in, t):
    s2 = (p["s"] ** 2)[:, None, None, None]
    a = 1.0 - t
    x0 = p["mu"] + a * s2 / (a * a * s2 + t * t) * (x_in - a * p["mu"])
    v = (x_in - x0) / t
    if use_coupling:
      v = v + jnp.einsum("ij,bjthw->bithw", p["A"], x_in) + p["kappa"] * x_in[:, :, :1]
    return v

  def net(x_in, timesteps, text, cond_mask):
    calls.append(x_in.shape[0])
    is_c = (jnp.mean(text, axis=tuple(range(1, text.ndim))) > 0.5)[:, None, None, None, None]
    t = (timesteps.astype(jnp.float32) * 0.001)[:, None, :, None, None]
    return jnp.where(is_c, branch(pc, x_in, t), branch(pu, x_in, t))

  return net, calls


@pytest.mark.parametrize("name", RUNS)
def test_full_loop_with_toy_net(rf, name):
  """The whole video2world loop (input replacement, velocity replacement, batched CFG, UniPC) -> P_final."""
  r = run_arrays(rf, name)
  noise = jnp.asarray(r["noise"])[None]
  gt = jnp.asarray(r["gt"])[None]
  t = noise.shape[2]
  n_cond = int(r["num_cond_frames"])
  np.testing.assert_array_equal(r["cond_mask_T"], (np.arange(t) < n_cond).astype(np.float32))
  net, calls = make_toy_velocity_net(rf, bool(r["use_coupling"]))
  text_c, text_u = jnp.ones((1, 3, 8)), jnp.zeros((1, 3, 8))
  final, traj = samplers.sample_rf(
      net, noise, _schedule(r), text_embeddings=text_c, uncond_text_embeddings=text_u, gt_latents=gt,
      cond_mask=conditional_frame_mask(n_cond, 1, t), guidance=float(r["guidance"]),
      conditional_frame_timestep=float(r["conditional_frame_timestep"]), return_trajectory=True)
  assert calls and all(b == (1 if float(r["guidance"]) == 0 else 2) for b in calls)  # one call per step
  np.testing.assert_allclose(final[0], r["final"], atol=TRAJ_ATOL, rtol=0)
  np.testing.assert_allclose(traj.x[:, 0], r["x"][:-1], atol=TRAJ_ATOL, rtol=0)
  np.testing.assert_allclose(traj.x0pred[:, 0], r["x0pred"], atol=TRAJ_ATOL, rtol=0)
  # Trajectory velocities scale like 1/sigma near the end; compare relative to their size.
  np.testing.assert_allclose(traj.v[:, 0], r["v"], atol=TRAJ_ATOL * (1 + np.abs(r["v"]).max()), rtol=0)
  np.testing.assert_allclose(final[0], r["final_f64_independent"], atol=TRAJ_ATOL, rtol=0)
  # Reference quirk 2: conditional frames end near, not at, gt; the optional paste puts them exactly there.
  pasted = samplers.sample_rf(
      net, noise, _schedule(r), text_embeddings=text_c, uncond_text_embeddings=text_u, gt_latents=gt,
      cond_mask=conditional_frame_mask(n_cond, 1, t), guidance=float(r["guidance"]),
      conditional_frame_timestep=float(r["conditional_frame_timestep"]), paste_gt_at_end=True)
  np.testing.assert_array_equal(pasted[0, :, :n_cond], r["gt"][:, :n_cond])
  np.testing.assert_allclose(pasted[0, :, n_cond:], r["final"][:, n_cond:], atol=TRAJ_ATOL, rtol=0)


def test_missing_input_replacement_fails(rf):
  """Guard: the toy net couples to the input's first frame, so skipping the input replacement is detectable."""
  r = run_arrays(rf, _coupled_run(rf, key=lambda r: int(r["num_steps"])))  # the shortest one
  noise = jnp.asarray(r["noise"])[None]
  t = noise.shape[2]
  net, _ = make_toy_velocity_net(rf, True)
  final = samplers.sample_rf(
      # A port that forgot the replacement would feed something else than gt there; here: the noise.
      lambda x, ts, text, m: net(jnp.where(m > 0, noise, x), ts, text, m), noise, _schedule(r),
      text_embeddings=jnp.ones((1, 3, 8)), uncond_text_embeddings=jnp.zeros((1, 3, 8)),
      gt_latents=jnp.asarray(r["gt"])[None], cond_mask=conditional_frame_mask(int(r["num_cond_frames"]), 1, t),
      guidance=float(r["guidance"]), conditional_frame_timestep=float(r["conditional_frame_timestep"]))
  assert np.abs(np.asarray(final[0]) - r["final"]).max() > 100 * TRAJ_ATOL


def test_gauss_run_close_to_closed_form(rf, load_fixture_json):
  if "gauss_analytic" not in rf:
    pytest.skip("rf_unipc.npz has no closed-form endpoint (gauss_analytic)")
  name = closed_form_run(rf)
  r = run_arrays(rf, name)
  net, _ = make_toy_velocity_net(rf, False)
  noise = jnp.asarray(r["noise"])[None]
  final = samplers.sample_rf(net, noise, _schedule(r), text_embeddings=jnp.ones((1, 2, 2)),
                             uncond_text_embeddings=None, gt_latents=None,
                             cond_mask=conditional_frame_mask(0, 1, noise.shape[2]), guidance=0.0)
  # The reference's own distance to the exact ODE endpoint (its discretisation error), plus our float32
  # distance to the reference.
  ref_distance = load_fixture_json("samplers/metrics.json")["rf_unipc"][name]["max_abs_final_vs_analytic"]
  assert np.abs(np.asarray(final[0], np.float64) - rf["gauss_analytic"]).max() <= ref_distance + TRAJ_ATOL


def test_generate_latents_batched_matches_single(rf):
  """Batch of 2 with different seeds / frame counts == two batch-1 runs (the reference only does batch 1)."""
  r = run_arrays(rf, _coupled_run(rf, key=lambda r: int(r["num_steps"])))  # the shortest one
  c, t, h, w = r["noise"].shape
  n_cond = int(r["num_cond_frames"])
  net, calls = make_toy_velocity_net(rf, True)
  gt = jnp.asarray(np.stack([r["gt"], r["gt"][:, ::-1]]))
  noise = jnp.asarray(np.stack([r["noise"], np.random.RandomState(7).standard_normal((c, t, h, w))]),
                      jnp.float32)
  text_c, text_u = jnp.ones((2, 3, 8)), jnp.zeros((2, 3, 8))
  kw = dict(guidance=float(r["guidance"]),
            sampler=samplers.RFSampler(num_steps=int(r["num_steps"]), shift=float(r["shift"]),
                                       use_karras_sigmas=bool(r["karras"]),
                                       conditional_frame_timestep=float(r["conditional_frame_timestep"])))
  both = samplers.generate_latents(net, (2, c, t, h, w), text_embeddings=text_c, uncond_text_embeddings=text_u,
                                   gt_latents=gt, num_conditional_frames=[n_cond, n_cond - 1], noise=noise, **kw)
  for b, n in enumerate([n_cond, n_cond - 1]):
    one = samplers.generate_latents(net, (1, c, t, h, w), text_embeddings=text_c[:1],
                                    uncond_text_embeddings=text_u[:1], gt_latents=gt[b:b + 1],
                                    num_conditional_frames=n, noise=noise[b:b + 1], **kw)
    np.testing.assert_allclose(both[b], one[0], atol=1e-5, rtol=0)
  # Element 0 is the fixture run; the default numpy seed path reproduces its noise.
  np.testing.assert_allclose(both[0], r["final"], atol=TRAJ_ATOL, rtol=0)
  seeded = samplers.generate_latents(net, (1, c, t, h, w), text_embeddings=text_c[:1],
                                     uncond_text_embeddings=text_u[:1], gt_latents=gt[:1],
                                     num_conditional_frames=int(r["num_cond_frames"]), seed=int(r["seed"]), **kw)
  np.testing.assert_allclose(seeded[0], r["final"], atol=TRAJ_ATOL, rtol=0)


# ----------------------------------------------------------------------------- spec §12 items 23-24


def test_spec_item23_straight_line():
  x = jnp.ones((2, 1, 3, 1, 1))  # latents = n = 1, exact velocity n - x0 with x0 = 0.3
  out = unipc_sample(lambda x, t: jnp.full_like(x, 0.7), x, rf_unipc_schedule(35, 5.0))
  np.testing.assert_allclose(out, 0.30014002323150635, atol=1e-6, rtol=0)


@pytest.mark.parametrize("karras,expected", [(False, 0.48932334780693054), (True, 0.5060051083564758)])
def test_spec_item24_gaussian(karras, expected):
  """Data N(0, 0.5^2), exact flow velocity at the solver sigma, start x = 1."""
  sched = rf_unipc_schedule(35, 5.0, use_karras_sigmas=karras)
  assert len(set(sched.timesteps.tolist())) == sched.num_evaluations  # timestep -> sigma lookup is unique
  taus = jnp.asarray(sched.timesteps, jnp.float32)
  sig = jnp.asarray(sched.sigmas[:-1])
  s2 = 0.25

  def vel(x, t):
    sg = sig[jnp.argmin(jnp.abs(taus - t[0, 0]))]
    x0 = (1 - sg) * s2 * x / ((1 - sg) ** 2 * s2 + sg ** 2)
    return (x - x0) / sg

  out = jax.jit(lambda x: unipc_sample(vel, x, sched))(jnp.ones((1, 1)))
  np.testing.assert_allclose(out[0, 0], expected, atol=1e-5, rtol=0)


def test_bad_sigmas_rejected():
  with pytest.raises(ValueError, match="end with 0"):
    unipc_coefficients(np.array([0.9, 0.5], np.float32))
  with pytest.raises(ValueError, match="num_steps"):
    rf_unipc_schedule(0)


@pytest.mark.parametrize("name", RUNS)
def test_net_receives_reference_timesteps(rf, name):
  """Timesteps tensor handed to the net per step and branch ((1, 1), or (1, T) with conditional_frame_timestep)."""
  r = run_arrays(rf, name)
  noise = jnp.asarray(r["noise"])[None]
  t = noise.shape[2]
  seen = []

  def spy(x_in, timesteps, text, cond_mask):
    jax.debug.callback(lambda ts: seen.append(np.asarray(ts, np.float64)), timesteps, ordered=True)
    return jnp.zeros_like(x_in)

  samplers.sample_rf(spy, noise, _schedule(r), text_embeddings=jnp.ones((1, 2)),
                     uncond_text_embeddings=jnp.zeros((1, 2)), gt_latents=jnp.asarray(r["gt"])[None],
                     cond_mask=conditional_frame_mask(int(r["num_cond_frames"]), 1, t),
                     guidance=float(r["guidance"]),
                     conditional_frame_timestep=float(r["conditional_frame_timestep"])).block_until_ready()
  got = np.stack(seen)  # (K, B', 1 or T)
  np.testing.assert_allclose(got[:, 0], r["net_timesteps_cond"], rtol=1e-7, atol=0)
  if float(r["guidance"]) != 0:
    np.testing.assert_allclose(got[:, 1], r["net_timesteps_uncond"], rtol=1e-7, atol=0)
