"""LoRA training state and step (training/lora.py): what trains, what stays frozen, where it starts.

In-process, the tiny config with ``lora.rank = 4``. The end-to-end runs (loss falls, SIGKILL and
resume, export and import) are in ``test_lora_e2e.py``.
"""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest

from configs import tiny
from v2w_jax.convert import dit as convert_dit
from v2w_jax.convert import lora as convert_lora
from v2w_jax.convert import torch_pt
from v2w_jax.inference.weights import random_params_like
from v2w_jax.models import dit, lora
from v2w_jax.parallel import mesh as mesh_lib
from v2w_jax.training import checkpoint as ckpt_lib
from v2w_jax.training import lora as lora_train
from v2w_jax.training import optim as optim_lib
from v2w_jax.training import resume as resume_lib
from v2w_jax.training import step as step_lib
from v2w_jax.training import trainer

RANK = 4


def _config(**lora_fields):
  config = tiny.get_config()
  config.lora.update({"rank": RANK, "alpha": 8.0, **lora_fields})
  return config


def _build(config):
  mesh = mesh_lib.make_mesh(config.mesh)
  cfg = trainer.dit_config(config)
  tx = optim_lib.make_optimizer(config)
  abstract, state_sh, initial_state = trainer.build_state(config, mesh, cfg, tx)
  return mesh, cfg, tx, abstract, state_sh, initial_state


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_only_the_adapters_train_and_the_base_stays_frozen_in_bf16():
  config = _config()
  mesh, cfg, tx, abstract, state_sh, initial_state = _build(config)
  state = initial_state()
  assert isinstance(state, lora_train.LoRATrainState)
  assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {np.dtype(ml_dtypes.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(np.float32)}
  assert not lora.has_adapters(state.frozen)
  assert all(p[-1] in lora.ADAPTER_LEAVES for p in jax.tree_util.tree_flatten_with_path(state.params)[0]
             for p in [[k.key for k in p[0]]])
  # Adam moments and EMA exist for the adapters only.
  assert jax.tree.structure(state.opt_state.mu) == jax.tree.structure(state.params)
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params)
  assert jax.tree.structure(lora_train.saved_part(state)).num_leaves == (
      1 + 4 * len(jax.tree.leaves(state.params)) + 1)  # step, params, mu, nu, ema, adam count
  frozen, adapters = _leaves(state.frozen), _leaves(state.params)

  train_step = step_lib.make_jitted_train_step(config, mesh, dit.apply_fn(cfg), state_sh, tx=tx)
  k = jax.random.split(jax.random.key(0), 2)
  batch = {"latents": jax.random.normal(k[0], (2, cfg.in_channels, 3, 4, 6)),
           "text_embeddings": jax.random.normal(k[1], (2, int(config.data.text_tokens), cfg.text_in_channels))}
  losses = []
  for _ in range(3):
    state, metrics = train_step(state, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)) and int(state.step) == 3
  for before, after in zip(frozen, _leaves(state.frozen)):
    np.testing.assert_array_equal(before, after)
  assert all(not np.array_equal(a, b) for a, b in zip(adapters, _leaves(state.params)))
  # The whole model the eval step and samples use: base + (EMA) adapters.
  whole = lora_train.model_params(state, ema=True)
  assert jax.tree.structure(whole) == jax.tree.structure(dit.abstract_params(cfg))


def _lora_pt(tmp_path, config, rank=RANK):
  """A reference LoRA net's .pt for the tiny model (base_layer weights + adapters) and its trees."""
  cfg = trainer.dit_config(config).replace(lora=lora.LoRASpec(rank, 8.0))
  base, adapters = lora.split_params(random_params_like(dit.abstract_params(cfg), seed=3))
  tensors = convert_lora.adapters_to_torch(adapters, cfg)
  state = {}
  for key, w in convert_dit.params_to_torch(base, cfg.replace(lora=None), dtype=np.float32).items():
    stem = key[: -len(".weight")]
    state[f"{stem}.base_layer.weight" if f"{stem}.lora_A.default.weight" in tensors else key] = w
  state.update(tensors)
  torch_pt.save(tmp_path / "reference_lora.pt", state)
  torch_pt.save(tmp_path / "adapters.pt", tensors)
  torch_pt.save(tmp_path / "base.pt", convert_dit.params_to_torch(base, cfg.replace(lora=None)))
  return base, adapters


def test_start_from_a_reference_lora_pt_or_from_init_path(tmp_path):
  config = _config()
  base, adapters = _lora_pt(tmp_path, config)
  for load_path, init_path in ((tmp_path / "reference_lora.pt", ""), (tmp_path / "base.pt", tmp_path / "adapters.pt")):
    config = _config(init_path=str(init_path))
    config.checkpoint.load_path = str(load_path)
    state = _build(config)[-1]()
    for got, want in zip(_leaves(state.params), jax.tree.leaves(adapters)):
      np.testing.assert_array_equal(got, want)
    for got, want in zip(_leaves(state.frozen), jax.tree.leaves(base)):
      np.testing.assert_array_equal(got, want.astype(ml_dtypes.bfloat16))


def test_adapters_that_do_not_fit_the_config_fail_clearly(tmp_path):
  _lora_pt(tmp_path, _config(), rank=2)
  config = _config(init_path=str(tmp_path / "adapters.pt"))
  with pytest.raises(ValueError, match=r"rank 2.*do not fit config.lora \(rank 4"):
    _build(config)[-1]()
  with pytest.raises(ValueError, match="config.lora.targets: attn.q_proj match no layer; layers that take "
                     "adapters: cross_attn.k_proj"):
    _build(_config(targets="attn.q_proj,mlp.layer1"))


def test_resume_checks_lora_settings_and_base_weights(tmp_path):
  config = _config()
  _, cfg, tx, abstract, _, initial_state = _build(config)
  state = initial_state()
  meta = {"config": json.loads(config.to_json_best_effort()), **lora_train.checkpoint_meta(state, config)}
  assert meta["lora"]["rank"] == RANK and meta["lora"]["base_dtype"] == "bfloat16"
  checkpointer = ckpt_lib.Checkpointer(tmp_path / "ck", keep=2, async_save=False)
  checkpointer.save(5, lora_train.saved_part(state), None, meta)
  checkpointer.close()

  def resume(cfg_now, abstract_now):
    checkpointer = ckpt_lib.Checkpointer(tmp_path / "ck", keep=2)
    try:
      restored = resume_lib.restore_newest_intact(checkpointer, lora_train.saved_part(abstract_now), None,
                                                  config=cfg_now, job=tmp_path)
      return lora_train.resume_state(restored.state, checkpointer.saved_meta(5), cfg_now,
                                     trainer.dit_config(cfg_now), abstract_now, 5)
    finally:
      checkpointer.close()

  for a, b in zip(_leaves(resume(config, abstract)), _leaves(state)):
    np.testing.assert_array_equal(a, b)
  other = _config()
  other.seed = 7  # another random base
  with pytest.raises(lora_train.BaseWeightsMismatchError, match="--config.seed=0"):
    resume(other, abstract)
  other = _config(alpha=16.0)
  with pytest.raises(ValueError, match="lora.alpha=8"):
    resume(other, abstract)
  for other in (_config(rank=8), tiny.get_config()):  # another rank; LoRA off
    with pytest.raises(resume_lib.IncompatibleCheckpoint, match=f"lora.rank {RANK} -> {other.lora.rank}"):
      resume(other, _build(other)[3])
