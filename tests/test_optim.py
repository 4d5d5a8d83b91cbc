"""LambdaLinear LR, torch-style AdamW (fp32 and reference bf16), clipping (training_spec §7-§8, §12)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import nemo
from v2w_jax.training import optim

NEMO = dict(warm_up_steps=(2000,), cycle_lengths=(100000,), f_start=(1e-6,), f_max=(0.5,), f_min=(0.2,))


@pytest.fixture(scope="module")
def fx(load_fixture_npz):
  return load_fixture_npz("samplers/lr_and_ema.npz")


def _fixture_schedule(fx):
  return dict(warm_up_steps=int(fx["lr_warm_up_steps"]), cycle_lengths=int(fx["lr_cycle_length"]),
              f_start=float(fx["lr_f_start"]), f_max=float(fx["lr_f_max"]), f_min=float(fx["lr_f_min"]))


def test_base_lr_spec_number_1():
  assert nemo.get_config().optim.lr == 4.315837287515549e-05


def test_lambda_linear_spec_number_2():
  expected = {0: 1e-06, 1: 0.0002509995, 500: 0.12500075, 999: 0.2497505005, 1999: 0.49975000049999996,
              2000: 0.5, 2001: 0.4999969387755102, 50000: 0.35306122448979593, 100000: 0.2}
  for k, v in expected.items():
    assert optim.lambda_linear(k, **NEMO) == pytest.approx(v, rel=1e-12, abs=1e-18), k


def test_lr_used_spec_number_3():
  base = nemo.get_config().optim.lr
  got = [base * optim.lambda_linear(k, **NEMO) for k in range(3)]
  np.testing.assert_allclose(got, [4.315837287515549e-11, 1.0832730012477591e-08, 2.1622301652080026e-08], rtol=1e-12)


def test_lambda_linear_against_fixture(fx):
  kw = _fixture_schedule(fx)
  for steps, mult in (("lr_steps", "lr_multiplier"), ("lr_sparse_steps", "lr_sparse_multiplier")):
    got = np.array([optim.lambda_linear(int(k), **kw) for k in fx[steps]])
    np.testing.assert_allclose(got, fx[mult], rtol=1e-12)
  used = float(fx["base_lr"]) * np.array([optim.lambda_linear(int(k), **kw) for k in fx["lr_steps"]])
  np.testing.assert_allclose(used, fx["lr_used"], rtol=1e-12)
  # The traced (float32) schedule.
  f = jax.jit(jax.vmap(optim.make_lambda_linear(**kw)))
  for steps, mult in (("lr_steps", "lr_multiplier"), ("lr_sparse_steps", "lr_sparse_multiplier")):
    np.testing.assert_allclose(np.asarray(f(jnp.asarray(fx[steps]))), fx[mult], rtol=1e-6)


def test_lr_schedule_from_config():
  """The recipe config holds the spec's schedule, and the trainer's traced lr(k) is optim.lr · f(k) of it."""
  cfg = nemo.get_config()
  assert optim.schedule_kwargs(cfg.schedule) == NEMO
  steps = np.concatenate([np.arange(0, 3001), np.arange(3000, 100001, 997), [100000, 100001, 150000]])
  want = cfg.optim.lr * np.array([optim.lambda_linear(int(k), **NEMO) for k in steps])
  sched = jax.jit(jax.vmap(optim.make_lr_schedule(cfg)))
  np.testing.assert_allclose(np.asarray(sched(jnp.asarray(steps))), want, rtol=1e-6)


def test_past_last_cycle_holds_f_min():
  assert optim.lambda_linear(150000, **NEMO) == 0.2
  assert optim.lambda_linear(100001, **NEMO) == 0.2
  f = optim.make_lambda_linear(**NEMO)
  assert float(f(150000)) == pytest.approx(0.2) and float(f(10**9)) == pytest.approx(0.2)


def _independent_multi_cycle(k, ws, ls, fs, fx_, fn):
  # Reference semantics: a step equal to a cycle's cumulative end belongs to that cycle.
  start = 0
  for w, l, a, b, c in zip(ws, ls, fs, fx_, fn):
    if k <= start + l:
      n = k - start
      return a + (b - a) * n / w if n < w else c + (b - c) * (l - n) / (l - w)
    start += l
  return fn[-1]


def test_multiple_cycles():
  kw = dict(warm_up_steps=(2, 4), cycle_lengths=(10, 20), f_start=(0.1, 0.3), f_max=(1.0, 0.8), f_min=(0.5, 0.05))
  args = tuple(kw[k] for k in ("warm_up_steps", "cycle_lengths", "f_start", "f_max", "f_min"))
  f = jax.jit(jax.vmap(optim.make_lambda_linear(**kw)))
  steps = np.arange(0, 40)
  want = np.array([_independent_multi_cycle(int(k), *args) for k in steps])
  got_np = np.array([optim.lambda_linear(int(k), **kw) for k in steps])
  np.testing.assert_allclose(got_np, want, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(f(jnp.asarray(steps))), want, rtol=1e-6)
  assert optim.lambda_linear(10, **kw) == 0.5  # end of cycle 0 = f_min of cycle 0
  assert optim.lambda_linear(11, **kw) == pytest.approx(0.3 + 0.5 * 1 / 4)  # cycle 1, local step 1
  assert optim.lambda_linear(31, **kw) == 0.05


def test_schedule_validation():
  with pytest.raises(ValueError, match="same"):
    optim.lambda_linear(0, warm_up_steps=(1, 2), cycle_lengths=(10,), f_start=(0,), f_max=(1,), f_min=(0,))
  with pytest.raises(ValueError, match="warm_up_steps < cycle_length"):
    optim.make_lambda_linear(warm_up_steps=(10,), cycle_lengths=(10,), f_start=(0,), f_max=(1,), f_min=(0,))


def test_clip_coefficient_spec_number_20():
  for norm, coef in ((0.5, 0.1999996000008), (2.0, 0.0499999750000125), (0.05, 1.0)):
    assert float(optim.clip_coefficient(jnp.float32(norm), 0.1)) == pytest.approx(coef, rel=1e-6)


def test_sanitize_and_clip():
  grads = {"a": jnp.asarray([3.0, jnp.nan, jnp.inf]), "b": jnp.asarray([[4.0, -jnp.inf]])}
  clipped, norm = optim.sanitize_and_clip(grads, 1.0)
  assert float(norm) == pytest.approx(5.0)  # nan/inf -> 0 before the norm
  coef = 1.0 / (5.0 + 1e-6)
  np.testing.assert_allclose(np.asarray(clipped["a"]), [3 * coef, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(clipped["b"]), [[4 * coef, 0]], rtol=1e-6)
  same, norm = optim.sanitize_and_clip({"a": jnp.asarray([0.01, 0.02])}, 1.0)
  np.testing.assert_array_equal(np.asarray(same["a"]), np.float32([0.01, 0.02]))


def _one_step(p, g, dtype, lr=1.0789614797975309e-05):
  tx = optim.torch_adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.001, moment_dtype=dtype)
  params = jnp.asarray(p, dtype)
  state = tx.init(params)
  upd, state = tx.update(jnp.asarray(g, dtype), state, params)
  return optax.apply_updates(params, upd), state


def test_bf16_adamw_spec_number_21():
  new_p, state = _one_step([1.0, 0.01, 0.3], [1.0, -1.0, 0.5], jnp.bfloat16)
  assert new_p.dtype == jnp.bfloat16 and state.mu.dtype == jnp.bfloat16 and state.nu.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(new_p, np.float64), [1.0, 0.010009765625, 0.30078125])  # unchanged
  np.testing.assert_array_equal(np.asarray(state.mu, np.float64), [0.10009765625, -0.10009765625, 0.050048828125])
  new_p32, _ = _one_step([1.0, 0.01, 0.3], [1.0, -1.0, 0.5], jnp.float32)
  np.testing.assert_allclose(np.asarray(new_p32, np.float64),
                             [0.9999892115592957, 0.010010789148509502, 0.2999892234802246], rtol=1.2e-7)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_adamw_matches_torch_over_steps(dtype_name):
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  p0 = rng.normal(0, 0.02, (64,)).astype(np.float32)
  grads = rng.normal(0, 1e-3, (6, 64)).astype(np.float32)
  lrs = [1e-4 * (k + 1) for k in range(6)]
  tdt = getattr(torch, dtype_name)
  tp = torch.tensor(p0).to(tdt).requires_grad_(True)
  topt = torch.optim.AdamW([tp], lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, fused=True)
  jdt = jnp.dtype(dtype_name)
  tx = optim.torch_adamw(lambda k: jnp.asarray(lrs)[k], weight_decay=0.01, moment_dtype=jdt)
  params = jnp.asarray(p0).astype(jdt)
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for k in range(6):
    for group in topt.param_groups:
      group["lr"] = lrs[k]
    tp.grad = torch.tensor(grads[k]).to(tdt)
    topt.step()
    upd, state = step(jnp.asarray(grads[k]).astype(jdt), state, params)
    params = optax.apply_updates(params, upd)
  want = tp.detach().float().numpy()
  got = np.asarray(params, np.float32)
  if dtype_name == "bfloat16":
    # Same arithmetic, one rounding per step: allow at most a couple of 1-ulp ties to differ.
    assert np.mean(got != want) < 0.05
    np.testing.assert_allclose(got, want, rtol=2 ** -7)
    assert np.mean(got != np.asarray(jnp.asarray(p0).astype(jnp.bfloat16), np.float32)) > 0.2  # it did move
  else:
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=1e-10)
  np.testing.assert_allclose(np.asarray(state.mu, np.float32), topt.state[tp]["exp_avg"].float().numpy(),
                             rtol=1e-5 if dtype_name == "float32" else 2 ** -7, atol=1e-12)


def test_weight_decay_filter():
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones((3,))}
  zero = jax.tree.map(jnp.zeros_like, params)
  for filt, b_decays in (("all", True), ("matrices", False)):
    tx = optim.torch_adamw(0.1, weight_decay=0.5, mask=lambda p, f=filt: optim.weight_decay_mask(p, f))
    upd, _ = tx.update(zero, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    assert np.allclose(np.asarray(new["w"]), 0.95)
    assert np.allclose(np.asarray(new["b"]), 0.95 if b_decays else 1.0)
  with pytest.raises(ValueError, match="weight_decay_filter"):
    optim.weight_decay_mask(params, "bias")


def test_make_optimizer_from_config_and_precision():
  cfg = nemo.get_config()
  assert optim.precision_dtypes("fp32_master") == (jnp.float32, jnp.float32)
  assert optim.precision_dtypes("reference_bf16") == (jnp.bfloat16, jnp.bfloat16)
  with pytest.raises(ValueError, match="precision"):
    optim.precision_dtypes("fp16")
  cfg.optim.precision = "reference_bf16"
  tx = optim.make_optimizer(cfg)
  st = tx.init({"w": jnp.ones((2, 2), jnp.bfloat16)})
  assert st.mu["w"].dtype == jnp.bfloat16 and int(st.count) == 0
  # First update uses lr = base · f(0).
  upd, st = tx.update({"w": jnp.ones((2, 2), jnp.bfloat16)}, st, {"w": jnp.zeros((2, 2), jnp.bfloat16)})
  assert float(upd["w"][0, 0]) == pytest.approx(-cfg.optim.lr * 1e-6, rel=1e-5)
  assert int(st.count) == 1


def test_split_microbatches_is_strided():
  x = jnp.arange(8)[:, None] * jnp.ones((1, 3))
  m = optim.split_microbatches({"x": x}, 2)["x"]
  assert m.shape == (2, 4, 3)
  np.testing.assert_array_equal(np.asarray(m[0, :, 0]), [0, 2, 4, 6])
  np.testing.assert_array_equal(np.asarray(m[1, :, 0]), [1, 3, 5, 7])
  with pytest.raises(ValueError, match="grad_accum_steps"):
    optim.split_microbatches({"x": x}, 3)
