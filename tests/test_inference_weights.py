"""Loading DiT / VAE weights for inference from every supported form (v2w_jax/inference/weights.py)."""

from __future__ import annotations

import re

import jax
import numpy as np
import optax
import pytest

from configs import tiny
from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import params_io, torch_pt
from v2w_jax.convert import vae as convert_vae
from v2w_jax.convert import load as L
from v2w_jax.inference import weights as W
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.models.vae import VAEConfig


@pytest.fixture(scope="module")
def dit_cfg() -> DiTConfig:
  return DiTConfig.from_config(tiny.get_config().model)


@pytest.fixture(scope="module")
def dit_params(dit_cfg):
  return W.random_dit_params(dit_cfg, seed=3)


def _assert_tree_equal(a, b):
  fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [k for k, _ in fa] == [k for k, _ in fb]
  for (k, x), (_, y) in zip(fa, fb):
    assert np.asarray(x).dtype == np.asarray(y).dtype, k
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(k))


def test_random_params_statistics(dit_cfg, dit_params):
  flat = {"/".join(str(k.key) for k in kp): v for kp, v in jax.tree_util.tree_flatten_with_path(dit_params)[0]}
  q = flat["blocks/self_attn/q_proj/kernel"]  # stacked [layers, D, D]: fan_in D, not layers * D
  assert q.shape == (dit_cfg.num_blocks, dit_cfg.model_channels, dit_cfg.model_channels)
  assert abs(q.std() * np.sqrt(dit_cfg.model_channels) - 1) < 0.05
  assert all((v == 0).all() for k, v in flat.items() if k.endswith("bias"))
  assert all((v == 1).all() for k, v in flat.items() if k.endswith("scale"))
  _assert_tree_equal(dit_params, W.random_dit_params(dit_cfg, seed=3))  # deterministic


def test_dit_from_torch_pt(tmp_path, dit_cfg, dit_params):
  path = tmp_path / "model_ema_fp32.pt"
  torch_pt.save(path, convert_dit.params_to_torch(dit_params, dit_cfg, lazy=True))
  assert L.checkpoint_kind(path) == "torch"
  _assert_tree_equal(W.load_dit_params(path, dit_cfg), dit_params)


def test_dit_from_params_folder(tmp_path, dit_cfg, dit_params):
  params_io.save_params(tmp_path / "dit", dit_params, metadata={"kind": "dit"})
  assert L.checkpoint_kind(tmp_path / "dit") == "params"
  _assert_tree_equal(W.load_dit_params(tmp_path / "dit", dit_cfg), dit_params)


def test_dit_from_training_checkpoint(tmp_path, dit_cfg, dit_params):
  from v2w_jax.training.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from v2w_jax.training.state import init_train_state  # pylint: disable=import-outside-toplevel

  state = init_train_state(dit_params, optax.adamw(1e-3))
  ema = jax.tree.map(lambda x: np.asarray(x) * 0.5 + 1.0, dit_params)
  ck = Checkpointer(tmp_path / "job" / "checkpoints", keep=3, async_save=False)
  ck.save(10, state.replace(ema_params=jax.tree.map(lambda x: x - 1.0, ema)), None, {"step": 10})
  ck.save(20, state.replace(ema_params=ema), None, {"step": 20})
  ck.close()
  job = tmp_path / "job"
  for p in (job, job / "checkpoints", job / "checkpoints" / "20", job / "checkpoints" / "20" / "state"):
    assert L.checkpoint_kind(p) == "train", p
    assert L.resolve_train_state_dir(p) == job / "checkpoints" / "20" / "state"
    _assert_tree_equal(W.load_dit_params(p, dit_cfg), ema)
  _assert_tree_equal(W.load_dit_params(job / "checkpoints" / "10", dit_cfg),
                     jax.tree.map(lambda x: x - 1.0, ema))
  _assert_tree_equal(W.load_dit_params(job, dit_cfg, use_ema=False), dit_params)
  # No EMA in the state: falls back to the raw parameters.
  ck = Checkpointer(tmp_path / "noema" / "checkpoints", keep=1, async_save=False)
  ck.save(1, init_train_state(dit_params, optax.sgd(1.0), ema_enabled=False), None, {})
  ck.close()
  _assert_tree_equal(W.load_dit_params(tmp_path / "noema", dit_cfg), dit_params)


def test_mismatch_and_bad_paths(tmp_path, dit_cfg, dit_params):
  params_io.save_params(tmp_path / "dit", dit_params)
  bigger = dit_cfg.replace(num_blocks=dit_cfg.num_blocks + 1)
  with pytest.raises(L.WeightsError, match="shape mismatch"):
    W.load_dit_params(tmp_path / "dit", bigger)
  path = tmp_path / "m.pt"
  torch_pt.save(path, convert_dit.params_to_torch(dit_params, dit_cfg, lazy=True))
  with pytest.raises(L.WeightsError, match=rf"DiT checkpoint {re.escape(str(path))} does not fit the configured model"):
    W.load_dit_params(path, bigger)
  with pytest.raises(L.WeightsError, match="does not exist"):
    W.load_dit_params(tmp_path / "nope", dit_cfg)
  (tmp_path / "empty").mkdir()
  with pytest.raises(L.WeightsError, match="not a checkpoint"):
    L.checkpoint_kind(tmp_path / "empty")
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(L.WeightsError, match="not a PyTorch checkpoint"):
    L.checkpoint_kind(tmp_path / "notes.txt")


def test_vae_from_pth_and_folder(tmp_path):
  cfg = VAEConfig.from_config(tiny.get_config().vae)
  params = W.random_vae_params(cfg, seed=1)
  torch_pt.save(tmp_path / "vae.pth", convert_vae.params_to_torch(params, cfg))
  _assert_tree_equal(W.load_vae_params(tmp_path / "vae.pth", cfg), params)
  params_io.save_params(tmp_path / "vae", params)
  _assert_tree_equal(W.load_vae_params(tmp_path / "vae", cfg), params)
  with pytest.raises(L.WeightsError, match="does not match"):
    W.load_vae_params(tmp_path / "vae.pth", VAEConfig.from_config(tiny.get_config().vae, base_dim=16))
