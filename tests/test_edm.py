"""EDM objective: preconditioning, loss weights, σ sampling strategies, loss (training_spec §2.2, §12)."""

from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import nemo_edm
from v2w_jax.diffusion import edm, rectified_flow
from v2w_jax.diffusion.objective import EDMObjective, make_objective
from v2w_jax.diffusion.timesteps import karras_sigmas

N = 200_000


def test_scalings_spec_number_10():
  s1 = jnp.float32(1.0)
  np.testing.assert_allclose([float(x) for x in edm.edm_scaling(s1, 0.5)], [0.2, 0.4472136, 0.89442719, 0.0],
                             rtol=1e-6, atol=1e-7)
  assert float(edm.loss_weight(s1, "edm", 0.5)) == pytest.approx(5.0)
  np.testing.assert_allclose([float(x) for x in edm.rf_scaling(s1)], [0.5, -0.5, 0.5, 0.5], rtol=1e-7)
  assert float(edm.loss_weight(s1, "rectified_flow")) == pytest.approx(4.0)
  s5 = jnp.float32(5.0)
  np.testing.assert_allclose([float(x) for x in edm.edm_scaling(s5, 0.5)],
                             [0.00990099, 0.4975186, 0.19900744, 0.40235948], rtol=1e-6)
  np.testing.assert_allclose([float(x) for x in edm.rf_scaling(s5)], [1 / 6, -5 / 6, 1 / 6, 5 / 6], rtol=1e-6)
  assert float(edm.loss_weight(s5, "rectified_flow")) == pytest.approx(1.44)
  sc = jnp.float32(1e-4)
  assert float(edm.edm_scaling(sc, 0.5)[3]) == pytest.approx(-2.302585093, rel=1e-6)
  assert float(edm.rf_scaling(sc)[3]) == pytest.approx(9.999e-05, rel=1e-4)
  with pytest.raises(ValueError, match="scaling"):
    edm.loss_weight(s1, "vp")


def test_constants_spec_number_11():
  assert edm.LOG_200 == 5.298317366548036
  assert edm.LOG_100000 == 11.512925464970229
  obj = EDMObjective()
  assert obj.video_noise_multiplier(24) == 4.898979485566356
  assert obj.video_noise_multiplier(1) == 1.0
  assert EDMObjective(adjust_video_noise=False).video_noise_multiplier(24) == 1.0
  assert EDMObjective(state_t=24).video_noise_multiplier(3) == 4.898979485566356


def test_logit_normal_equivalence_spec_number_12():
  sig = np.asarray(edm.sample_sigma(jax.random.key(0), N, p_mean=math.log(5.0), p_std=1.0, is_video=False))
  t = sig / (1 + sig)
  np.testing.assert_allclose(np.quantile(t, [0.05, 0.25, 0.5, 0.75, 0.95]),
                             [0.4915, 0.7185, 0.8333, 0.9077, 0.9628], atol=3e-3)


def test_class_default_sigma_with_video_noise_adjustment():
  t_lat = 24
  sig = np.asarray(edm.sample_sigma(jax.random.key(1), N, is_video=True, video_noise_multiplier=math.sqrt(t_lat),
                                    high_sigma_strategy="none"))
  logs = np.log(sig)
  assert abs(np.median(logs) - 0.5 * math.log(t_lat)) < 0.01
  assert abs(np.std(logs) - 1.0) < 0.01
  # Image batches: no multiplier, no high-sigma replacement.
  img = np.asarray(edm.sample_sigma(jax.random.key(1), N, is_video=False, video_noise_multiplier=math.sqrt(t_lat),
                                    high_sigma_strategy="uniform80_2000"))
  assert abs(np.median(np.log(img))) < 0.01 and np.mean(img > 80) < 0.001


def _p_lognormal_above(x, mean):
  return 1 - statistics.NormalDist(mean, 1.0).cdf(math.log(x))


def test_uniform80_2000():
  mult = math.sqrt(24)
  sig = np.asarray(edm.sample_sigma(jax.random.key(2), N, video_noise_multiplier=mult,
                                    high_sigma_strategy="uniform80_2000", high_sigma_ratio=0.05))
  p_base = _p_lognormal_above(80, math.log(mult))
  assert abs(np.mean(sig >= 80) - (0.05 + 0.95 * p_base)) < 0.003
  # Above 200 the base draw is negligible (P ~ 1e-4): what remains is U(80, 2000) restricted to [200, 2000].
  assert abs(np.mean(sig > 200) - 0.05 * 1800 / 1920) < 0.002
  assert sig.max() <= 2000 and abs(np.mean(sig[sig > 200]) - 1100) < 15


def test_loguniform200_100000():
  sig = np.asarray(edm.sample_sigma(jax.random.key(3), N, high_sigma_strategy="LOGUNIFORM200_100000"))
  high = sig[sig >= 200]
  assert abs(high.size / N - 0.05) < 0.003
  assert high.max() <= 100000 * (1 + 1e-5)
  assert abs(np.mean(np.log(high)) - 0.5 * (edm.LOG_200 + edm.LOG_100000)) < 0.05


def test_shift24():
  sig = np.asarray(edm.sample_sigma(jax.random.key(4), N, high_sigma_strategy="shift24", high_sigma_ratio=0.05))
  # Base: sigma = 24u/(1-u); P(sigma <= 24) = 0.5 before the 5 % U(80, 2000) replacement.
  assert abs(np.mean(sig <= 24.0) - 0.95 * 0.5) < 0.004
  assert abs(np.mean(sig <= 24.0 / 3.0) - 0.95 * 0.25) < 0.004  # u = 1/4 -> sigma = 8


def test_balanced_two_heads():
  sig = np.asarray(edm.sample_sigma(jax.random.key(5), N, high_sigma_strategy="balanced_two_heads_v1",
                                    high_sigma_ratio=0.05, low_sigma_ratio=0.05))
  p_base_below2 = statistics.NormalDist().cdf(math.log(2.0))
  expected = 0.05 + 0.95 * 0.95 * p_base_below2
  assert abs(np.mean(sig < 2.00001) - expected) < 0.004
  assert abs(np.mean(sig >= 200) - 0.95 * 0.05) < 0.003


def test_hardcoded_20steps():
  table = edm.hardcoded_20steps_sigmas(0.01, 200.0)
  assert table.shape == (22,) and table[0] == 1e5
  np.testing.assert_array_equal(table[1:], karras_sigmas(200.0, 0.01, 20, 7.0))
  sig = np.asarray(edm.sample_sigma(jax.random.key(6), 44_000, high_sigma_strategy="hardcoded_20steps",
                                    sigma_min=0.01, sigma_max=200.0))
  t32 = table.astype(np.float32)
  assert np.all(np.isin(sig, t32))
  counts = np.array([np.sum(sig == v) for v in t32])
  assert np.all(np.abs(counts / sig.size - 1 / 22) < 0.006)


def test_unknown_strategy():
  with pytest.raises(ValueError, match="high_sigma_strategy"):
    edm.sample_sigma(jax.random.key(0), 2, high_sigma_strategy="uniform")


def _data(b=2, c=3, t=4, h=2, w=2, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (b, c, t, h, w)), jax.random.normal(k2, (b, c, t, h, w))


def test_rf_scaling_loss_equals_10x_velocity_mse():  # spec §2.2 step 5 / §12 number 10
  x0, eps = _data()
  b, t = x0.shape[0], x0.shape[2]
  mask = jnp.zeros((b, t))
  net = lambda x, ts: 0.7 * x.astype(jnp.float32) - 0.2  # any function of the input only
  sigma = jnp.float32([0.5, 3.0])
  loss_edm, _ = edm.edm_loss(net, x0, eps, sigma, mask, sigma_data=1.0, scaling="rectified_flow",
                             loss_scale=10.0, net_dtype=jnp.float32)
  t_rf = sigma / (1 + sigma)  # the same point on the RF line
  loss_rf, _ = rectified_flow.rf_loss(net, x0, eps, t_rf * 1000, t_rf, mask, net_dtype=jnp.float32)
  assert float(loss_edm) / 10 == pytest.approx(float(loss_rf), rel=1e-5)


def test_edm_loss_conditioning_and_gradients():
  x0, eps = _data(b=2, t=5, seed=1)
  b, t = 2, 5
  mask = (jnp.arange(t)[None] < jnp.asarray([2, 1])[:, None]).astype(jnp.float32)
  sigma = jnp.float32([2.0, 0.3])
  seen = {}

  def net(x, ts):
    seen["x"], seen["ts"] = x, ts
    return jnp.zeros(x.shape, jnp.float32)

  edm.edm_loss(net, x0, eps, sigma, mask, sigma_data=0.5, net_dtype=jnp.float32)
  x_in, ts = np.asarray(seen["x"]), np.asarray(seen["ts"])
  assert ts.shape == (b, t)
  c_noise = 0.25 * np.log(np.asarray(sigma))
  np.testing.assert_allclose(ts[0], [math.log(1e-4) / 4] * 2 + [c_noise[0]] * 3, rtol=1e-6)
  np.testing.assert_allclose(ts[1], [math.log(1e-4) / 4] + [c_noise[1]] * 4, rtol=1e-6)
  x0n, epsn, sn = np.asarray(x0), np.asarray(eps), np.asarray(sigma)[:, None, None, None, None]
  c_in = 1 / np.sqrt(sn**2 + 0.25)
  np.testing.assert_allclose(x_in[0, :, :2], x0n[0, :, :2] / 0.5, rtol=1e-6)
  np.testing.assert_allclose(x_in[0, :, 2:], (c_in * (x0n + sn * epsn))[0, :, 2:], rtol=1e-5)

  def loss(wt):
    f = lambda x, ts: wt[None, None, :, None, None] * x.astype(jnp.float32)
    return edm.edm_loss(f, x0, eps, sigma, mask, net_dtype=jnp.float32)[0]

  g = np.asarray(jax.jit(jax.grad(loss))(jnp.full((t,), 0.1)))
  assert g[0] == 0.0  # frame 0 is conditional in every sample
  assert np.all(np.abs(g[2:]) > 0)


def test_edm_loss_weighting_and_scale():
  x0, eps = _data(b=1, t=2, seed=2)
  mask = jnp.zeros((1, 2))
  sigma = jnp.float32([1.0])
  net = lambda x, ts: jnp.zeros(x.shape, jnp.float32)
  # net = 0 -> x0_pred = c_skip x_sigma; loss = scale · w · mean((x0 - c_skip x_sigma)^2).
  loss, _ = edm.edm_loss(net, x0, eps, sigma, mask, sigma_data=0.5, loss_scale=10.0, net_dtype=jnp.float32)
  x0n, en = np.asarray(x0, np.float64), np.asarray(eps, np.float64)
  expected = 10 * 5.0 * np.mean((x0n - 0.2 * (x0n + en)) ** 2)
  assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_objective_from_nemo_edm_config():
  cfg = nemo_edm.get_config()
  cfg.model.timestep_scale = 1.0
  obj = make_objective(cfg)
  assert isinstance(obj, EDMObjective)
  assert (obj.sigma_data, obj.scaling, obj.loss_scale, obj.high_sigma_strategy) == (0.5, "edm", 10.0, "uniform80_2000")
  assert obj.net_dtype == jnp.bfloat16
  x0, eps = _data(seed=3)
  cond_mask = jnp.zeros((2, 4))
  net = lambda x, ts: 0.5 * x.astype(jnp.float32)
  level = obj.sample_noise_level(jax.random.key(0), 2, 4)

  class Cond:
    frame_mask_B_T = cond_mask

  got, _ = obj.loss(net, x0, eps, level, Cond())
  want, _ = edm.edm_loss(net, x0 * 0.5, eps, level.sigma, cond_mask, sigma_data=0.5)  # latents × σ_data
  assert float(got) == pytest.approx(float(want), rel=1e-6)
  # Fixed validation timesteps: tau -> sigma_EDM = t/(1-t).
  fixed = obj.noise_level_at(jnp.float32([500.0, 800.0]), 4)
  np.testing.assert_allclose(np.asarray(fixed.sigma), [1.0, 4.0], rtol=1e-6)
