"""Power EMA: γ, β(k), the float32 update (training_spec §9, §12 number 4; fixtures lr_and_ema.npz)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v2w_jax.training import ema


@pytest.fixture(scope="module")
def fx(load_fixture_npz):
  return load_fixture_npz("samplers/lr_and_ema.npz")


def test_gamma_spec_number_4():
  g = ema.power_ema_gamma(0.1)
  assert g == pytest.approx(6.937203937601809, rel=1e-14)
  assert np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(0.1, rel=1e-12)
  with pytest.raises(ValueError, match="ema.rate"):
    ema.power_ema_gamma(0.0)


def test_beta_spec_number_4():
  g = ema.power_ema_gamma(0.1)
  ks = [0, 1, 10, 100, 1000, 10000]
  want = [0.0, 0.004080031659650188, 0.46930784758070104, 0.9240604335279343, 0.9920981471030854, 0.9992066341708383]
  np.testing.assert_allclose(ema.power_ema_beta_np(ks, g), want, rtol=1e-12)
  got32 = jax.jit(jax.vmap(lambda k: ema.power_ema_beta(k, g)))(jnp.asarray(ks))
  np.testing.assert_allclose(np.asarray(got32), want, rtol=2e-6)
  assert float(got32[0]) == 0.0


def test_against_fixture(fx):
  g = ema.power_ema_gamma(float(fx["ema_rate"]))
  assert g == pytest.approx(float(fx["ema_gamma"]), rel=1e-12)
  np.testing.assert_allclose(ema.power_ema_beta_np(fx["ema_iters"], g), fx["ema_beta"], rtol=1e-12)
  got32 = jax.jit(jax.vmap(lambda k: ema.power_ema_beta(k, g)))(jnp.asarray(fx["ema_iters"]))
  np.testing.assert_allclose(np.asarray(got32), fx["ema_beta"], rtol=2e-6, atol=0)


def test_toy_trajectory_against_fixture(fx):
  g = ema.power_ema_gamma(float(fx["ema_rate"]))
  net = fx["ema_toy_net_bf16_values"]
  e = {"w": jnp.asarray(fx["ema_toy_init"], jnp.float32)}
  update = jax.jit(ema.ema_update)
  for k in range(net.shape[0]):
    beta = ema.power_ema_beta(jnp.int32(k), g)
    assert float(beta) == pytest.approx(float(fx["ema_toy_beta"][k]), rel=2e-6, abs=0)
    e = update(e, {"w": jnp.asarray(net[k]).astype(jnp.bfloat16)}, beta)
    assert e["w"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(e["w"]), fx["ema_toy_traj"][k], atol=1e-7, rtol=0)
    np.testing.assert_allclose(np.asarray(e["w"]), fx["ema_toy_traj_f64"][k], atol=1e-7, rtol=0)


def test_first_update_copies_exactly():
  params = {"a": jax.random.normal(jax.random.key(0), (5,)).astype(jnp.bfloat16), "b": jnp.float32([1.5, -2.0])}
  stale = {"a": jnp.full((5,), 7.0), "b": jnp.full((2,), -3.0)}
  new = ema.ema_update(stale, params, ema.power_ema_beta(jnp.int32(0), ema.power_ema_gamma(0.1)))
  np.testing.assert_array_equal(np.asarray(new["a"]), np.asarray(params["a"], np.float32))
  np.testing.assert_array_equal(np.asarray(new["b"]), np.asarray(params["b"]))
  init = ema.init_ema(params)
  assert init["a"].dtype == jnp.float32


def test_window_beta_is_the_product_of_the_steps_decays():
  g = ema.power_ema_gamma(0.1)
  for last, n in ((1, 2), (3, 2), (10, 4), (1000, 10), (5, 7)):
    want = float(np.prod(ema.power_ema_beta_np(np.arange(last - n + 1, last + 1), g)))
    got = float(jax.jit(lambda k: ema.power_ema_beta_window(k, n, g))(jnp.int32(last)))
    assert got == pytest.approx(want, rel=3e-6, abs=1e-30)
  # One step: exactly the per-step decay (the default path's numbers are unchanged).
  assert float(ema.power_ema_beta_window(jnp.int32(17), 1, g)) == float(ema.power_ema_beta(jnp.int32(17), g))
