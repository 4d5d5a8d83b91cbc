"""The train step: pixel normalisation, step semantics, accumulation, precision modes, eval step, and
FSDP equivalence on 8 fake CPU devices (a subprocess: the main pytest process has one device).

Run as a script (``python tests/test_train_step.py WORKER_ARGS``) it is the 8-device worker.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from configs import tiny
from v2w_jax.parallel import rules as R
from v2w_jax.training import ema as ema_lib
from v2w_jax.training import optim
from v2w_jax.training import state as state_lib
from v2w_jax.training import step as step_lib

TEXT_DIM = 24
# The FSDP-equivalence recipe (shared by the 8-device worker and the one-device reference).
FSDP_BATCH, FSDP_STEPS, FSDP_SEED, FSDP_RNG = 8, 2, 11, 5


class ToyNet(nn.Module):
  """A tiny per-token MLP over the latent with the DiT's call signature and logical partitioning."""

  width: int = 32

  @nn.compact
  def __call__(self, x, timesteps, crossattn_emb, cond_mask, padding_mask=None, is_image=False):
    del padding_mask
    b, c, t, h, w = x.shape
    cm = jnp.zeros_like(cond_mask) if is_image else cond_mask
    feats = jnp.concatenate([x.astype(jnp.float32), cm.astype(jnp.float32)], axis=1)
    tok = feats.transpose(0, 2, 3, 4, 1).reshape(b, t * h * w, c + 1)
    tok = nn.with_logical_constraint(tok, (R.ACT_BATCH, R.ACT_LENGTH, None))

    def dense(features, names, name):
      return nn.Dense(features, name=name, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), names[1:]))

    ts = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(b, -1), (b, t))
    ts = jnp.repeat(ts, h * w, axis=1)[..., None] * 0.001
    text = jnp.mean(crossattn_emb.astype(jnp.float32), axis=1)
    hdn = dense(self.width, (R.PATCH, R.EMBED), "x_in")(tok) + dense(self.width, (None, R.EMBED), "t_in")(ts)
    hdn = nn.gelu(hdn + dense(self.width, (R.TEXT_IN, R.EMBED), "text_in")(text)[:, None])
    hdn = hdn + dense(self.width, (R.MLP, R.EMBED), "mlp_out")(nn.gelu(dense(2 * self.width, (R.EMBED, R.MLP), "mlp_in")(hdn)))
    out = dense(c, (R.EMBED, R.PATCH), "out")(hdn)
    return out.reshape(b, t, h, w, c).transpose(0, 4, 1, 2, 3)


def toy_apply(params, *args, **kwargs):
  return ToyNet().apply({"params": params}, *args, **kwargs)


def toy_boxed_init(key, c=16):
  x = jnp.zeros((1, c, 2, 2, 2))
  return ToyNet().init(key, x, jnp.zeros((1, 1)), jnp.zeros((1, 3, TEXT_DIM)), jnp.zeros((1, 1, 2, 2, 2)))["params"]


def toy_init(key):
  return nn.meta.unbox(toy_boxed_init(key))


def toy_config(**optim_overrides):
  cfg = tiny.get_config()
  cfg.optim.clip_grad_norm = 0.1
  cfg.optim.update(optim_overrides)
  return cfg


def make_batch(b=8, t=3, h=2, w=4, seed=0, forced=None):
  """Random latents and bf16 text embeddings (numpy RNG: no device compilation)."""
  rng = np.random.default_rng(seed)
  batch = {"latents": jnp.asarray(rng.standard_normal((b, 16, t, h, w), np.float32)),
           "text_embeddings": jnp.asarray(rng.standard_normal((b, 5, TEXT_DIM), np.float32).astype(ml_dtypes.bfloat16))}
  if forced is not None:
    batch["num_conditional_frames"] = jnp.asarray(np.asarray(forced, np.int32))
  return batch


def np_global_norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64))) for x in jax.tree.leaves(tree))))


def jitted_update(tx):
  """(grads, opt_state, params, scale) -> params after AdamW on scale·grads, in one compiled call."""
  def f(grads, opt_state, params, scale):
    upd, _ = tx.update(jax.tree.map(lambda g: g * scale, grads), opt_state, params)
    return optax.apply_updates(params, upd)
  return jax.jit(f)


# ------------------------------------------------------------------------------ pixel normalisation


def test_normalize_video_spec_number_13():
  v = jnp.asarray([0, 1, 127, 128, 200, 255], jnp.uint8)
  out = step_lib.normalize_video(v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float64), [-1.0, -0.9921875, -0.00390625, 0.0078125, 0.5703125, 1.0])


def test_normalize_video_all_values_per_op_bf16():
  v = np.arange(256, dtype=np.uint8)
  bf = ml_dtypes.bfloat16
  # The reference: to(bf16) -> / 127.5 -> - 1, each op rounded to bf16 (torch computes in f32 and rounds).
  ref = (v.astype(np.float32).astype(bf).astype(np.float32) / np.float32(127.5)).astype(bf)
  ref = (ref.astype(np.float32) - np.float32(1.0)).astype(bf)
  got = jax.jit(step_lib.normalize_video)(jnp.asarray(v).reshape(1, 1, 256, 1, 1))
  np.testing.assert_array_equal(np.asarray(got, np.float32).ravel(), ref.astype(np.float32))
  assert np.max(np.abs(ref.astype(np.float64) - (v / 127.5 - 1))) == pytest.approx(0.00389, abs=1e-4)


# ----------------------------------------------------------------------------- single-device steps


@pytest.fixture(scope="module")
def toy_setup():
  cfg = toy_config()
  tx = optim.make_optimizer(cfg)
  state = jax.jit(state_lib.state_init_fn(toy_init, tx, cfg))(jax.random.key(0))
  step = jax.jit(step_lib.make_train_step(cfg, toy_apply, tx=tx))
  return cfg, tx, state, step


def test_step_semantics(toy_setup):
  cfg, tx, state, step = toy_setup
  batch = make_batch()
  s1, m1 = step(state, batch, jax.random.key(1))
  assert int(s1.step) == 1 and int(s1.opt_state.count) == 1
  assert float(m1["lr"]) == pytest.approx(cfg.optim.lr * 0.1, rel=1e-6)  # f_start of the tiny schedule
  assert float(m1["ema_beta"]) == 0.0
  jax.tree.map(lambda e, p: np.testing.assert_array_equal(np.asarray(e), np.asarray(p)), s1.ema_params, s1.params)
  assert np.isfinite(float(m1["loss"])) and float(m1["grad_nonfinite"]) == 0.0
  s2, m2 = step(s1, batch, jax.random.key(1))
  assert int(s2.step) == 2
  g = ema_lib.power_ema_gamma(cfg.ema.rate)
  assert float(m2["ema_beta"]) == pytest.approx(float(ema_lib.power_ema_beta_np(1, g)), rel=1e-6)
  f1 = optim.lambda_linear(1, **optim.schedule_kwargs(cfg.schedule))
  assert float(m2["lr"]) == pytest.approx(cfg.optim.lr * f1, rel=1e-6)
  # Same rng, different step -> different draws (the step folds state.step into the key).
  assert float(m1["loss"]) != float(m2["loss"])
  # Deterministic: the same call gives bit-identical results.
  s1b, m1b = step(state, batch, jax.random.key(1))
  assert float(m1b["loss"]) == float(m1["loss"])
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s1.params, s1b.params)


def test_step_matches_independent_update(toy_setup):
  """grad_norm is the pre-clip norm; the update is clip + AdamW + EMA of exactly those gradients."""
  cfg, tx, state, step = toy_setup
  batch = make_batch(seed=3)
  rng = jax.random.key(7)
  s1, m = step(state, batch, rng)
  loss_fn = step_lib.make_loss_fn(cfg, toy_apply)
  key = jax.random.fold_in(rng, state.step)
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, batch, key)
  norm = np_global_norm(grads)
  assert float(m["loss"]) == pytest.approx(float(loss), rel=1e-6)
  assert float(m["grad_norm"]) == pytest.approx(norm, rel=1e-5)
  assert norm > cfg.optim.clip_grad_norm  # clipping is active in this test
  coef = cfg.optim.clip_grad_norm / (norm + 1e-6)
  assert float(m["clip_coef"]) == pytest.approx(coef, rel=1e-5)
  want = jitted_update(tx)(grads, state.opt_state, state.params, jnp.float32(coef))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
               s1.params, want)


def test_gradient_accumulation_is_mean_over_strided_microbatches():
  cfg = toy_config(grad_accum_steps=2, clip_grad_norm=0.0)
  tx = optim.make_optimizer(cfg)
  state = jax.jit(state_lib.state_init_fn(toy_init, tx, cfg))(jax.random.key(0))
  batch = make_batch(b=4, seed=4)
  rng = jax.random.key(2)
  s1, m = jax.jit(step_lib.make_train_step(cfg, toy_apply, tx=tx))(state, batch, rng)
  loss_fn = jax.jit(jax.value_and_grad(step_lib.make_loss_fn(cfg, toy_apply), has_aux=True))
  key = jax.random.fold_in(rng, state.step)
  losses, grads = [], []
  for j in range(2):
    mb = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[j::2]), batch)
    (l, _), g = loss_fn(state.params, mb, jax.random.fold_in(key, j))
    losses.append(float(l))
    grads.append(g)
  mean_g = jax.tree.map(lambda a, b: (np.asarray(a) + np.asarray(b)) / 2, *grads)
  assert float(m["loss"]) == pytest.approx(np.mean(losses), rel=1e-6)
  assert float(m["grad_norm"]) == pytest.approx(np_global_norm(mean_g), rel=1e-5)
  want = jitted_update(tx)(mean_g, state.opt_state, state.params, jnp.float32(1.0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7),
               s1.params, want)


def test_reference_bf16_precision_and_ema_shift():
  cfg = toy_config(precision="reference_bf16")
  cfg.ema.iteration_shift = 5
  tx = optim.make_optimizer(cfg)
  init = state_lib.state_init_fn(toy_init, tx, cfg)
  state = jax.jit(init)(jax.random.key(0))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(state.params))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves((state.opt_state.mu, state.opt_state.nu)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.ema_params))
  s1, m = jax.jit(step_lib.make_train_step(cfg, toy_apply, tx=tx))(state, make_batch(), jax.random.key(0))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(s1.params))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(s1.ema_params))
  g = ema_lib.power_ema_gamma(cfg.ema.rate)
  assert float(m["ema_beta"]) == pytest.approx(float(ema_lib.power_ema_beta_np(5, g)), rel=1e-6)


def test_ema_disabled():
  cfg = toy_config()
  cfg.ema.enabled = False
  tx = optim.make_optimizer(cfg)
  state = jax.eval_shape(state_lib.state_init_fn(toy_init, tx, cfg), jax.random.key(0))
  assert state.ema_params is None
  s1, m = jax.eval_shape(step_lib.make_train_step(cfg, toy_apply, tx=tx), state, make_batch(), jax.random.key(0))
  assert s1.ema_params is None and "ema_beta" not in m and "loss" in m


def test_forced_conditional_frames_and_video_path():
  cfg = toy_config()
  cfg.conditioning.caption_dropout = 0.0
  seen = {}

  def encode_fn(video):
    seen["dtype"] = video.dtype
    x = step_lib.normalize_video(video).astype(jnp.float32)  # [B,3,T,H,W] -> fake 16-channel latents
    return jnp.tile(x[:, :, :, ::2, ::2], (1, 6, 1, 1, 1))[:, :16]

  def apply_fn(params, x, ts, emb, mask, pad, is_image):
    seen["mask_shape"], seen["is_image"] = mask.shape, is_image
    return toy_apply(params, x, ts, emb, mask, pad, is_image)

  loss_fn = step_lib.make_loss_fn(cfg, apply_fn, encode_fn)
  video = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 3, 3, 4, 8), dtype=np.uint8))
  batch = {"video": video, "text_embeddings": np.ones((2, 5, TEXT_DIM)), "num_conditional_frames": np.int32([2, 3])}
  params = jax.jit(toy_init)(jax.random.key(0))
  loss, m = jax.jit(loss_fn)(params, batch, jax.random.key(1))
  assert seen["dtype"] == jnp.uint8 and seen["is_image"] is False and seen["mask_shape"] == (2, 1, 3, 2, 4)
  assert float(m["caption_dropped"]) == 0.0 and float(m["num_conditional_frames"]) == 2.5
  # Image batch (T = 1): is_image and no conditional frames whatever is forced.
  img = {"latents": np.ones((2, 16, 1, 2, 2)), "text_embeddings": np.ones((2, 5, TEXT_DIM)),
         "num_conditional_frames": np.int32([1, 1])}
  _, m = jax.eval_shape(step_lib.make_loss_fn(cfg, apply_fn), params, img, jax.random.key(1))
  assert seen["is_image"] is True
  with pytest.raises(ValueError, match="without encode_fn"):
    jax.eval_shape(step_lib.make_loss_fn(cfg, apply_fn), params, batch, jax.random.key(1))
  with pytest.raises(ValueError, match="text_embeddings"):
    jax.eval_shape(loss_fn, params, {"latents": np.ones((2, 16, 3, 2, 2))}, jax.random.key(1))
  with pytest.raises(ValueError, match="'latents' or 'video'"):
    jax.eval_shape(loss_fn, params, {"text_embeddings": np.ones((2, 5, TEXT_DIM))}, jax.random.key(1))


def test_eval_step_fixed_timesteps():
  cfg = toy_config()
  params = jax.jit(toy_init)(jax.random.key(0))
  ev = jax.jit(step_lib.make_eval_step(cfg, toy_apply))
  batch = make_batch(seed=5)
  a = ev(params, batch, jax.random.key(3), jnp.float32(500.0))
  b = ev(params, batch, jax.random.key(3), jnp.float32(500.0))
  c = ev(params, batch, jax.random.key(3), jnp.float32(900.0))
  assert float(a["loss"]) == float(b["loss"]) and float(a["loss"]) != float(c["loss"])
  assert float(a["timestep_mean"]) == 500.0 and float(a["sigma_mean"]) == pytest.approx(0.5)
  assert float(a["caption_dropped"]) == 0.0


# ------------------------------------------------------------------------- 8 fake devices (FSDP)


def _mesh_run(cfg, steps=3, compile_first=False):
  """Runs `steps` jitted steps of the toy model on a one-device mesh per `cfg`; (state, metrics list, step)."""
  from v2w_jax.parallel import sharding as S
  from v2w_jax.parallel.mesh import make_mesh

  mesh = make_mesh(dict(data=1, fsdp=1, context=1))
  tx = optim.make_optimizer(cfg)
  ps = S.param_shardings_from_boxed(jax.eval_shape(toy_boxed_init, jax.random.key(0)), mesh, cfg.mesh.rules)
  state, shardings = state_lib.create_train_state_sharded(toy_init, tx, cfg, mesh, ps, jax.random.key(0))
  step = step_lib.make_jitted_train_step(cfg, mesh, toy_apply, shardings, tx=tx)
  batch = jax.device_put(make_batch(seed=2), S.batch_sharding(mesh))
  if compile_first:
    step.compile(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state),
                 batch, jax.random.key(3))
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch, jax.random.key(3))
    metrics.append({k: float(v) for k, v in m.items()})
  return state, metrics, step


def _assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("update", ["in_step", "separate"])
def test_offloaded_ema_lives_on_the_host_and_equals_the_device_ema(update):
  ref_state, ref_metrics, _ = _mesh_run(toy_config())
  cfg = toy_config()
  cfg.ema.update(offload=True, offload_update=update)
  state, metrics, step = _mesh_run(cfg, compile_first=True)
  assert all(e.sharding.memory_kind == "pinned_host" for e in jax.tree.leaves(state.ema_params))
  assert all(p.sharding.memory_kind == "device" for p in jax.tree.leaves(state.params))
  assert set(step.program_names) == ({"step"} if update == "in_step" else {"step_no_ema", "ema"})
  assert len(step._compiled) == len(step.program_names)  # pylint: disable=protected-access
  _assert_trees_equal(state.params, ref_state.params)
  _assert_trees_equal(state.ema_params, ref_state.ema_params)
  if update == "in_step":
    assert [m["ema_beta"] for m in metrics] == [m["ema_beta"] for m in ref_metrics]
  on_device = ema_lib.to_device(state.ema_params)
  assert all(e.sharding.memory_kind == "device" for e in jax.tree.leaves(on_device))


def test_ema_every_n_steps_updates_with_the_window_decay():
  """N = 2 over 4 steps: step 1 copies the parameters (the window holds k = 0), step 3 decays by
  β(2)·β(3) = (2/4)^(γ+1); steps 0 and 2 leave the EMA as it is (ema_beta reported as 1)."""
  cfg = toy_config()
  cfg.ema.every_n_steps = 2
  states = []
  for n in (2, 4):
    state, metrics, _ = _mesh_run(cfg, steps=n)
    states.append(state)
  g = ema_lib.power_ema_gamma(cfg.ema.rate)
  beta = (2 / 4) ** (g + 1)
  assert [m["ema_beta"] for m in metrics] == pytest.approx([1.0, 0.0, 1.0, beta], rel=1e-6)
  assert beta == pytest.approx(float(np.prod(ema_lib.power_ema_beta_np([2, 3], g))), rel=1e-12)
  _assert_trees_equal(states[0].ema_params, states[0].params)
  want = jax.tree.map(lambda e, p: np.asarray(e) * np.float32(beta) + np.asarray(p) * np.float32(1 - beta),
                      states[0].ema_params, states[1].params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-7),
               states[1].ema_params, want)


def test_ema_settings_are_validated():
  cfg = toy_config()
  cfg.ema.every_n_steps = 0
  with pytest.raises(ValueError, match="every_n_steps"):
    step_lib.make_train_step(cfg, toy_apply)
  cfg.ema.every_n_steps = 1
  cfg.ema.offload_update = "later"
  with pytest.raises(ValueError, match="offload_update"):
    step_lib.make_train_step(cfg, toy_apply)


def _worker(out_dir: str, use_dit: bool) -> None:
  """Runs in a subprocess with 8 CPU devices; writes results.npz + results.json into out_dir."""
  from v2w_jax.parallel import sharding as S
  from v2w_jax.parallel.mesh import make_mesh

  assert jax.device_count() == 8, jax.device_count()
  out: dict[str, np.ndarray] = {}
  info: dict[str, object] = {}
  if use_dit:
    from v2w_jax.models import dit
    from v2w_jax.models.dit_config import DiTConfig

    cfg = toy_config()
    cfg.model.update(dict(num_blocks=1, model_channels=32, num_heads=2, adaln_lora_dim=8, crossattn_emb_channels=16,
                          crossattn_proj_in_channels=TEXT_DIM, scan_blocks=False, remat_policy="none"))
    dcfg = DiTConfig.from_config(cfg.model)
    apply_fn = dit.apply_fn(dcfg)
    init_fn = lambda k: dit.init_params(dcfg, k)
    boxed = dit.abstract_variables(dcfg)["params"]
    runs = {"plain": None, "d2f4": dict(data=2, fsdp=4, context=1)}
  else:  # the single-device reference runs in the parent pytest process
    cfg = toy_config()
    apply_fn, init_fn = toy_apply, toy_init
    boxed = jax.eval_shape(toy_boxed_init, jax.random.key(0))
    runs = {"d2f4": dict(data=2, fsdp=4, context=1), "d1f8": dict(data=1, fsdp=8, context=1)}
  batch_size, steps = FSDP_BATCH, FSDP_STEPS
  tx = optim.make_optimizer(cfg)
  batch = make_batch(b=batch_size, seed=FSDP_SEED)
  rng = jax.random.key(FSDP_RNG)
  for name, mesh_cfg in runs.items():
    if mesh_cfg is None:
      state = jax.jit(state_lib.state_init_fn(init_fn, tx, cfg))(jax.random.key(0))
      step = jax.jit(step_lib.make_train_step(cfg, apply_fn, tx=tx))
    else:
      mesh = make_mesh(mesh_cfg)
      ps = S.param_shardings_from_boxed(boxed, mesh, cfg.mesh.rules)
      state, shardings = state_lib.create_train_state_sharded(init_fn, tx, cfg, mesh, ps, jax.random.key(0))
      # Born sharded: every array already carries its target sharding; FSDP splits the embed axes.
      flat_state = jax.tree.leaves(state)
      flat_sh = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
      assert len(flat_state) == len(flat_sh)
      info[f"{name}_born_sharded"] = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(flat_state, flat_sh))
      fsdp = mesh.shape["fsdp"]
      n_split = 0
      for path, p in jax.tree_util.tree_leaves_with_path(state.params):
        spec = p.sharding.spec
        if "fsdp" in jax.tree.leaves(tuple(spec)):
          n_split += 1
          dim = [i for i, a in enumerate(spec) if a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a)][0]
          assert p.addressable_shards[0].data.shape[dim] == p.shape[dim] // fsdp, (path, spec)
      info[f"{name}_fsdp_sharded_params"] = n_split
      info[f"{name}_mu_follows_params"] = all(
          m.sharding.is_equivalent_to(p.sharding, p.ndim)
          for m, p in zip(jax.tree.leaves(state.opt_state.mu), jax.tree.leaves(state.params)))
      step = step_lib.make_jitted_train_step(cfg, mesh, apply_fn, shardings, tx=tx)
      batch_in = jax.device_put(batch, S.batch_sharding(mesh))
      if not use_dit:
        # A global batch smaller than data×fsdp is replicated instead of failing; eval on the mesh.
        step.lower(state, make_batch(b=2, seed=1), rng)
        ev = step_lib.jit_eval_step(step_lib.make_eval_step(cfg, apply_fn), mesh, shardings.params)
        info[f"{name}_eval_loss"] = float(ev(state.params, batch_in, rng, 500.0)["loss"])
    losses, norms = [], []
    for _ in range(steps):
      state, m = step(state, batch if mesh_cfg is None else batch_in, rng)
      losses.append(float(m["loss"]))
      norms.append(float(m["grad_norm"]))
    out[f"{name}_loss"] = np.asarray(losses)
    out[f"{name}_grad_norm"] = np.asarray(norms)
    for i, leaf in enumerate(jax.tree.leaves(state.params)):
      out[f"{name}_param_{i}"] = np.asarray(leaf, np.float32)
    for i, leaf in enumerate(jax.tree.leaves(state.ema_params)):
      out[f"{name}_ema_{i}"] = np.asarray(leaf, np.float32)
    if mesh_cfg is not None:
      info[f"{name}_params_still_sharded"] = all(
          p.sharding.is_equivalent_to(s, p.ndim) for p, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(
              shardings.params, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))))
  info["num_params"] = len(jax.tree.leaves(state.params))
  np.savez(pathlib.Path(out_dir) / "results.npz", **out)
  (pathlib.Path(out_dir) / "results.json").write_text(json.dumps(info))


def _plain_reference(toy_setup) -> dict[str, np.ndarray]:
  """The one-device run of the worker's toy-model recipe (same config, init, batch, rng, step count)."""
  cfg, _, state, step = toy_setup
  batch, rng = make_batch(b=FSDP_BATCH, seed=FSDP_SEED), jax.random.key(FSDP_RNG)
  out = {"plain_loss": [], "plain_grad_norm": []}
  ev = jax.jit(step_lib.make_eval_step(cfg, toy_apply))
  eval_loss = float(ev(state.params, batch, rng, jnp.float32(500.0))["loss"])  # initial params, as the worker
  for _ in range(FSDP_STEPS):
    state, m = step(state, batch, rng)
    out["plain_loss"].append(float(m["loss"]))
    out["plain_grad_norm"].append(float(m["grad_norm"]))
  out = {k: np.asarray(v) for k, v in out.items()}
  out["plain_eval_loss"] = eval_loss
  for i, leaf in enumerate(jax.tree.leaves(state.params)):
    out[f"plain_param_{i}"] = np.asarray(leaf, np.float32)
  for i, leaf in enumerate(jax.tree.leaves(state.ema_params)):
    out[f"plain_ema_{i}"] = np.asarray(leaf, np.float32)
  return out


def _run_worker(repo_root, tmp_path, use_dit: bool):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(repo_root))
  args = [sys.executable, str(pathlib.Path(__file__).resolve()), str(tmp_path)] + (["--dit"] if use_dit else [])
  proc = subprocess.run(args, cwd=repo_root, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return dict(np.load(tmp_path / "results.npz")), json.loads((tmp_path / "results.json").read_text())


def _check_equivalence(res, info, names=("d2f4", "d1f8"), plain_eval_loss=None):
  for name in names:
    if plain_eval_loss is not None:
      assert info[f"{name}_eval_loss"] == pytest.approx(plain_eval_loss, rel=2e-5)
    assert info[f"{name}_born_sharded"] and info[f"{name}_mu_follows_params"], info
    assert info[f"{name}_fsdp_sharded_params"] >= 2, info
    assert info[f"{name}_params_still_sharded"], info
    np.testing.assert_allclose(res[f"{name}_loss"], res["plain_loss"], rtol=2e-5)
    np.testing.assert_allclose(res[f"{name}_grad_norm"], res["plain_grad_norm"], rtol=2e-4)
    for i in range(info["num_params"]):
      np.testing.assert_allclose(res[f"{name}_param_{i}"], res[f"plain_param_{i}"], rtol=1e-4, atol=2e-6)
      np.testing.assert_allclose(res[f"{name}_ema_{i}"], res[f"plain_ema_{i}"], rtol=1e-4, atol=2e-6)
  # The steps really trained: parameters moved and losses differ between steps.
  assert len(set(res["plain_loss"].tolist())) == len(res["plain_loss"])


def test_fsdp_equivalence_toy_model(repo_root, tmp_path, toy_setup):
  res, info = _run_worker(repo_root, tmp_path, use_dit=False)
  res.update(_plain_reference(toy_setup))
  _check_equivalence(res, info, plain_eval_loss=res.pop("plain_eval_loss"))


@pytest.mark.slow
def test_fsdp_equivalence_real_dit(repo_root, tmp_path):
  pytest.importorskip("v2w_jax.models.dit")
  res, info = _run_worker(repo_root, tmp_path, use_dit=True)
  _check_equivalence(res, info, names=("d2f4",))


if __name__ == "__main__":
  _worker(sys.argv[1], "--dit" in sys.argv[2:])
