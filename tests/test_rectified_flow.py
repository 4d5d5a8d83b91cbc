"""Rectified-flow objective: training table, time sampling, interpolation, loss (training_spec §2.1, §12)."""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v2w_jax.diffusion import rectified_flow as rf
from v2w_jax.diffusion.objective import RectifiedFlowObjective


@pytest.fixture(scope="module")
def fx(load_fixture_npz):
  return load_fixture_npz("samplers/rf_train_time.npz")


def test_table_bit_exact_against_fixture(fx):
  tau, sig = rf.train_time_table(float(fx["shift"]), int(fx["table_timesteps"].shape[0]))
  assert tau.dtype == np.float32 and sig.dtype == np.float32
  np.testing.assert_array_equal(tau, fx["table_timesteps"])
  np.testing.assert_array_equal(sig, fx["table_sigmas"])


def test_table_spec_numbers():  # §12 number 5
  tau, sig = rf.train_time_table(5.0, 1000)
  assert (tau[0], sig[0]) == (1000.0, 1.0)
  expected = {1: 999.7998046875, 100: 978.2608642578125, 250: 937.5, 500: 833.3333129882812, 750: 625.0,
              900: 357.1428527832031, 990: 48.07691955566406, 998: 9.920635223388672, 999: 4.9800801277160645}
  for i, v in expected.items():
    assert float(tau[i]) == v, i
  assert float(sig[500]) == 0.8333333134651184
  assert float(sig[999]) == 0.004980080295354128


def test_u_to_index_tau_sigma_against_fixture(fx):
  tau, sig = rf.train_time_table(float(fx["shift"]), int(fx["table_timesteps"].shape[0]))
  n = tau.shape[0]
  for u_key, idx_key in (("u", "u_index"), ("draw_u", "draw_index")):
    idx = np.asarray(rf.time_index_from_u(jnp.asarray(fx[u_key]), n))
    np.testing.assert_array_equal(idx, fx[idx_key])
  idx = np.asarray(rf.time_index_from_u(jnp.asarray(fx["u"]), n))
  np.testing.assert_array_equal(tau[idx], fx["u_tau"])
  np.testing.assert_array_equal(sig[idx], fx["u_sigma"])
  idx = np.asarray(rf.time_index_from_u(jnp.asarray(fx["draw_u"]), n))
  np.testing.assert_array_equal(tau[idx], fx["draw_tau"])
  np.testing.assert_array_equal(sig[idx], fx["draw_sigma"])
  # u just below k/1000 whose float32 product rounds up to k: the index is k (floor of the exact would be k-1).
  ub = fx["u_boundary"]
  expected = (ub.astype(np.float32) * np.float32(n)).astype(np.int64)
  np.testing.assert_array_equal(np.asarray(rf.time_index_from_u(jnp.asarray(ub), n)), expected)
  assert np.all(ub.astype(np.float64) * n < expected)  # really boundary cases


def test_u_one_is_clamped():  # reference quirk 9
  assert int(rf.time_index_from_u(jnp.float32(1.0))) == 999


def test_z_to_tau_spec_numbers():  # §12 number 6
  tau, _ = rf.train_time_table()
  z = jnp.asarray([0.0, 1.0, -1.0, 2.0], jnp.float32)
  idx = np.asarray(rf.time_index_from_u(jax.nn.sigmoid(z)))
  np.testing.assert_array_equal(idx, [500, 731, 268, 880])
  np.testing.assert_array_equal(tau[idx], np.float32([833.3333129882812, 647.8805541992188, 931.7718505859375,
                                                      405.4053649902344]))


def test_high_sigma_candidates(fx):  # §12 number 7
  tau, _ = rf.train_time_table(float(fx["shift"]), int(fx["table_timesteps"].shape[0]))
  # The reference's window is a pair of integer timesteps (the recipe's 980..1000); the fixture stores the
  # candidates it selects, and the window they came from is recovered from them.
  ref_tau = fx["high_sigma_timesteps"]
  lo, hi = math.floor(float(ref_tau.min())), math.ceil(float(ref_tau.max()))
  cand = rf.high_sigma_candidates(tau, lo, hi)
  np.testing.assert_array_equal(cand, fx["high_sigma_indices"])
  np.testing.assert_array_equal(tau[cand], ref_tau)
  assert np.all((tau[cand] >= lo) & (tau[cand] <= hi)) and np.sum((tau >= lo) & (tau <= hi)) == cand.size
  with pytest.raises(ValueError, match="contains no table timestep"):
    rf.high_sigma_candidates(tau, 1001.0, 1002.0)


def test_interpolation_against_fixture(fx):
  x_t, v = rf.interpolate(jnp.asarray(fx["interp_x0"]), jnp.asarray(fx["interp_eps"]), jnp.asarray(fx["interp_sigma"]))
  np.testing.assert_array_equal(np.asarray(x_t), fx["interp_xt"])
  np.testing.assert_array_equal(np.asarray(v), fx["interp_v_target"])


def test_interpolation_spec_number():  # §12 number 8
  x_t, v = rf.interpolate(jnp.zeros((1, 2, 3, 1, 1)), jnp.ones((1, 2, 3, 1, 1)), jnp.float32([0.8333333134651184]))
  assert np.all(np.asarray(x_t) == np.float32(0.8333333134651184)) and np.all(np.asarray(v) == 1.0)


def _exact_quantiles(shift: float, qs):
  # sigma = shift·e^z / (1 + shift·e^z) with z ~ N(0, 1) (the odds of the logit-normal times `shift`).
  out = []
  for q in qs:
    z = statistics.NormalDist().inv_cdf(q)
    out.append(shift * np.exp(z) / (1 + shift * np.exp(z)))
  return np.array(out)


def test_sampled_sigma_quantiles():  # §12 number 12
  obj = RectifiedFlowObjective()
  level = obj.sample_noise_level(jax.random.key(0), 200_000, 24)
  sig = np.asarray(level.sigma)
  qs = [0.05, 0.25, 0.5, 0.75, 0.95]
  got = np.quantile(sig, qs)
  np.testing.assert_allclose(got, [0.4915, 0.7185, 0.8333, 0.9077, 0.9628], atol=3e-3)
  np.testing.assert_allclose(got, _exact_quantiles(5.0, qs), atol=3e-3)
  tau, table_sig = obj.table
  # Each drawn (tau, sigma) pair is a table row.
  idx = np.searchsorted(-tau, -np.asarray(level.timestep))
  np.testing.assert_array_equal(table_sig[idx], sig)


def test_uniform_time_distribution_quantiles():
  obj = RectifiedFlowObjective(train_time_distribution="uniform")
  sig = np.asarray(obj.sample_noise_level(jax.random.key(1), 100_000, 24).sigma)
  u = np.array([0.1, 0.5, 0.9])
  # index = floor(1000 u) -> s = 1 - index/1000 ~ 1 - u, sigma = 5 s / (1 + 4 s).
  s = 1 - u
  np.testing.assert_allclose(np.quantile(sig, 1 - u), 5 * s / (1 + 4 * s), atol=4e-3)
  with pytest.raises(ValueError, match="train_time_distribution"):
    RectifiedFlowObjective(train_time_distribution="beta").sample_noise_level(jax.random.key(0), 2, 1)


def test_high_sigma_strategy_fraction():
  n = 200_000
  obj = RectifiedFlowObjective(use_high_sigma_strategy=True, high_sigma_ratio=0.05)
  tau = np.asarray(obj.sample_noise_level(jax.random.key(2), n, 24).timestep)
  p_base = statistics.NormalDist().cdf(np.log(0.093 / 0.907))  # P(index <= 92) under the logit-normal
  expected = 0.05 + 0.95 * p_base
  assert abs(np.mean(tau >= 980.0) - expected) < 0.004
  off = RectifiedFlowObjective()
  tau_off = np.asarray(off.sample_noise_level(jax.random.key(2), n, 24).timestep)
  assert abs(np.mean(tau_off >= 980.0) - p_base) < 0.003


def test_sampling_is_deterministic():
  obj = RectifiedFlowObjective()
  a = obj.sample_noise_level(jax.random.key(5), 16, 3)
  b = obj.sample_noise_level(jax.random.key(5), 16, 3)
  c = obj.sample_noise_level(jax.random.key(6), 16, 3)
  np.testing.assert_array_equal(np.asarray(a.timestep), np.asarray(b.timestep))
  assert not np.array_equal(np.asarray(a.timestep), np.asarray(c.timestep))


def _mask(b, t, n):
  return (jnp.arange(t)[None, :] < jnp.asarray(n)[:, None]).astype(jnp.float32)


def test_loss_spec_number_9():  # 2 of 24 conditional frames, v_pred = 0, eps = 1, x0 = 0 -> 22/24
  b, c, t, h, w = 2, 4, 24, 2, 2
  x0, eps = jnp.zeros((b, c, t, h, w)), jnp.ones((b, c, t, h, w))
  zero_net = lambda x, ts: jnp.zeros(x.shape, jnp.float32)
  sig = jnp.full((b,), 0.8333333134651184, jnp.float32)
  loss, aux = rf.rf_loss(zero_net, x0, eps, sig * 1000, sig, _mask(b, t, [2, 2]))
  assert float(loss) == pytest.approx(22 / 24, rel=1e-7)
  assert abs(float(loss) - 0.9166666865348816) <= 6e-8
  np.testing.assert_allclose(np.asarray(aux["sq_err_per_sample"]), 22 / 24, rtol=1e-7)
  loss_m, _ = rf.rf_loss(zero_net, x0, eps, sig * 1000, sig, _mask(b, t, [2, 2]), loss_reduce="masked_mean")
  assert float(loss_m) == pytest.approx(1.0, rel=1e-7)
  with pytest.raises(ValueError, match="loss_reduce"):
    rf.rf_loss(zero_net, x0, eps, sig * 1000, sig, _mask(b, t, [2, 2]), loss_reduce="sum")


def test_masked_mean_per_sample_and_all_conditional():
  b, c, t = 2, 3, 4
  x0, eps = jnp.zeros((b, c, t, 1, 1)), jnp.ones((b, c, t, 1, 1))
  net = lambda x, ts: jnp.zeros(x.shape, jnp.float32)
  sig = jnp.full((b,), 0.5)
  # sample 0: 1 conditional frame (err 1 on 3 frames -> 1); sample 1: all 4 conditional -> contributes 0.
  loss, _ = rf.rf_loss(net, x0, eps, sig * 1000, sig, _mask(b, t, [1, 4]), loss_reduce="masked_mean")
  assert float(loss) == pytest.approx(0.5)
  loss_mean, _ = rf.rf_loss(net, x0, eps, sig * 1000, sig, _mask(b, t, [1, 4]))
  assert float(loss_mean) == pytest.approx(3 / 8)


def test_network_inputs_and_timesteps():
  b, c, t, h, w = 2, 3, 5, 2, 2
  k1, k2 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k1, (b, c, t, h, w))
  eps = jax.random.normal(k2, (b, c, t, h, w))
  sig = jnp.float32([0.9, 0.3])
  tau = sig * 1000
  seen = {}

  def net(x, ts):
    seen["x"], seen["ts"] = x, ts
    return jnp.zeros(x.shape, jnp.float32)

  mask = _mask(b, t, [2, 0])
  rf.rf_loss(net, x0, eps, tau, sig, mask)
  x_in, ts = np.asarray(seen["x"].astype(jnp.float32)), np.asarray(seen["ts"])
  assert seen["x"].dtype == jnp.bfloat16
  assert ts.shape == (b, 1) and np.array_equal(ts[:, 0], np.asarray(tau))
  x_t = np.asarray(sig)[:, None, None, None, None] * np.asarray(eps) + (1 - np.asarray(sig))[:, None, None, None, None] * np.asarray(x0)
  bf = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(x_in[0, :, :2], bf(x0)[0, :, :2])  # clean conditional frames (bf16)
  np.testing.assert_array_equal(x_in[0, :, 2:], bf(x_t)[0, :, 2:])
  np.testing.assert_array_equal(x_in[1], bf(x_t)[1])
  # conditional_frame_timestep >= 0 -> per-frame timesteps with that value on conditional frames.
  rf.rf_loss(net, x0, eps, tau, sig, mask, conditional_frame_timestep=0.1, net_dtype=jnp.float32)
  ts = np.asarray(seen["ts"])
  assert seen["x"].dtype == jnp.float32 and ts.shape == (b, t)
  np.testing.assert_allclose(ts[0], [0.1, 0.1, 900, 900, 900], rtol=1e-6)
  np.testing.assert_allclose(ts[1], [300] * t, rtol=1e-6)


def test_conditional_frames_give_no_gradient():
  b, c, t, h, w = 3, 2, 4, 2, 2
  k1, k2 = jax.random.split(jax.random.key(1))
  x0 = jax.random.normal(k1, (b, c, t, h, w))
  eps = jax.random.normal(k2, (b, c, t, h, w))
  sig = jnp.float32([0.2, 0.6, 0.95])
  mask = _mask(b, t, [2, 2, 2])

  def loss(wt):  # a per-frame linear "net": v = w_t · x_in
    net = lambda x, ts: wt[None, None, :, None, None] * x.astype(jnp.float32)
    return rf.rf_loss(net, x0, eps, sig * 1000, sig, mask)[0]

  g = np.asarray(jax.jit(jax.grad(loss))(jnp.full((t,), 0.3)))
  assert np.all(g[:2] == 0.0)
  assert np.all(np.abs(g[2:]) > 0)
