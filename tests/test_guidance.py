"""CFG combination, batched branches and conditional-frame re-imposition (samplers fixtures, README §1, §3)."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import sampler_runs
from v2w_jax.diffusion import guidance as G


@pytest.fixture(scope="module")
def rf(load_fixture_npz):
  return load_fixture_npz("samplers/rf_unipc.npz")


@pytest.fixture(scope="module")
def edm(load_fixture_npz):
  return load_fixture_npz("samplers/edm_sampler.npz")


def test_cfg_forms():
  c, u = jnp.float32(2.0), jnp.float32(0.5)
  assert float(G.cfg_combine(c, u, 7.0)) == 2.0 + 7.0 * 1.5  # video2world: g = 7 ~ classic scale 8
  assert float(G.cfg_combine(c, u, 7.0, form="text2world")) == 0.5 + 7.0 * 1.5
  assert float(G.cfg_combine(c, u, 0.0)) == 2.0
  with pytest.raises(ValueError, match="guidance form"):
    G.cfg_combine(c, u, 1.0, form="classic")


def test_rf_guided_velocity_matches_reference(rf):
  for run in sampler_runs(rf):
    g = float(rf[f"{run}_guidance"])
    v_c, v_u = jnp.asarray(rf[f"{run}_v_cond"]), jnp.asarray(rf[f"{run}_v_uncond"])
    v = np.asarray(G.cfg_combine(v_c, v_u, g))
    ref = rf[f"{run}_v"]
    np.testing.assert_allclose(v, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max(), err_msg=run)


def test_edm_guided_x0_matches_reference(edm):
  for run in sampler_runs(edm):
    g = float(edm[f"{run}_guidance"])
    n = edm[f"{run}_x0pred"].shape[0]
    # The reference combines the float32 branch outputs in float32, then promotes to its float64 state.
    d = G.cfg_combine(jnp.asarray(edm[f"{run}_x0_cond"][:n]), jnp.asarray(edm[f"{run}_x0_uncond"][:n]), g)
    assert d.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(d, np.float64), edm[f"{run}_x0pred"], err_msg=run)


def test_batched_cfg_call_is_one_call():
  calls = []

  def fn(x, ts, text, mask):
    calls.append((x.shape, ts.shape, text["emb"].shape, mask.shape))
    return x * text["emb"].sum(axis=(1, 2))[:, None, None, None, None] + ts[:, :, None, None, None]

  b = 3
  x = jnp.arange(b * 2 * 4 * 1 * 1, dtype=jnp.float32).reshape(b, 2, 4, 1, 1)
  ts = jnp.full((b, 1), 5.0)
  mask = G.conditional_frame_mask(1, b, 4)
  tc, tu = {"emb": jnp.ones((b, 2, 3))}, {"emb": jnp.zeros((b, 2, 3))}
  oc, ou = G.batched_cfg_call(fn, (x, ts, tc, mask), (x, ts, tu, mask))
  assert len(calls) == 1 and calls[0][0][0] == 2 * b and calls[0][2] == (2 * b, 2, 3)
  np.testing.assert_array_equal(oc, x * 6 + 5)
  np.testing.assert_array_equal(ou, jnp.zeros_like(x) + 5)


def test_masks_and_replacement():
  m = G.conditional_frame_mask([2, 0, 1], 3, 4)
  assert m.shape == (3, 1, 4, 1, 1)
  np.testing.assert_array_equal(m[:, 0, :, 0, 0], [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
  x, gt, n = jnp.full((3, 2, 4, 1, 2), 5.0), jnp.full((3, 2, 4, 1, 2), 0.3), jnp.full((3, 2, 4, 1, 2), 1.0)
  xi = G.impose_input_frames(x, gt, m)
  np.testing.assert_array_equal(xi[0, :, :2], np.float32(0.3))
  np.testing.assert_array_equal(xi[0, :, 2:], 5.0)
  np.testing.assert_array_equal(xi[1], 5.0)
  v = G.impose_rf_velocity(x, n, gt, m)
  np.testing.assert_allclose(v[2, :, 0], 0.7, rtol=1e-7)
  np.testing.assert_array_equal(v[2, :, 1:], 5.0)
  np.testing.assert_array_equal(G.impose_x0_frames(x, gt, m)[0, :, :2], np.float32(0.3))
  with pytest.raises(ValueError, match=r"\[B, 1, T, 1, 1\]"):
    G.check_mask(jnp.ones((3, 4)), x)
  with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
    G.check_mask(m, jnp.ones((3, 4)))


def test_rf_fixture_velocity_replacement(rf):
  """Reference quirk 4: conditional-frame velocity is n_init - gt at every step, in both branches."""
  for run in sampler_runs(rf):
    n = int(rf[f"{run}_num_cond_frames"])
    if n == 0:
      continue
    t = rf[f"{run}_noise"].shape[1]
    m = G.conditional_frame_mask(n, 1, t)
    noise, gt = jnp.asarray(rf[f"{run}_noise"])[None], jnp.asarray(rf[f"{run}_gt"])[None]
    for key in ("v_cond", "v_uncond"):
      v = jnp.asarray(rf[f"{run}_{key}"])
      np.testing.assert_array_equal(G.impose_rf_velocity(v, noise, gt, m), v, err_msg=f"{run} {key}")


def test_frame_timesteps_match_reference(rf):
  for run in sampler_runs(rf):
    cft = float(rf[f"{run}_conditional_frame_timestep"])
    t = rf[f"{run}_noise"].shape[1]
    m = G.conditional_frame_mask(int(rf[f"{run}_num_cond_frames"]), 1, t)
    taus = rf[f"{run}_timesteps"]
    got = np.stack([np.asarray(G.frame_timesteps(jnp.full((1, 1), float(tau)), m, cft))[0] for tau in taus])
    np.testing.assert_allclose(got, rf[f"{run}_net_timesteps_cond"], rtol=1e-7, atol=0, err_msg=run)


def test_initial_noise_matches_reference(rf, edm):
  for data in (rf, edm):
    for run in sampler_runs(data):
      ref = data[f"{run}_noise"]
      got = G.initial_noise((1,) + ref.shape, int(data[f"{run}_seed"]))
      assert got.dtype == jnp.float32
      np.testing.assert_array_equal(got[0], ref)
  k = G.initial_noise((2, 3), key=jax.random.key(0))
  assert k.shape == (2, 3) and k.dtype == jnp.float32
  with pytest.raises(ValueError, match="seed"):
    G.initial_noise((2, 3))
