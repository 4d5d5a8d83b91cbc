"""configs/nemo_edm.py: the EDM objective with the DiT taking c_noise unscaled (timestep_scale 1.0), and the
train step running with it on the tiny model sizes (CPU)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from configs import nemo, nemo_edm, tiny
from v2w_jax.diffusion.objective import EDMObjective, make_objective
from v2w_jax.models import dit
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.training import optim
from v2w_jax.training import state as state_lib
from v2w_jax.training import step as step_lib


def tiny_edm_config():
  """The tiny model and data sizes with everything nemo_edm changes relative to nemo."""
  c = tiny.get_config()
  e = nemo_edm.get_config()
  c.objective = e.objective
  c.model.timestep_scale = e.model.timestep_scale
  c.optim.clip_grad_norm = e.optim.clip_grad_norm
  return c


def test_nemo_edm_objective_without_warning(caplog):
  c = nemo_edm.get_config()
  with caplog.at_level(logging.WARNING):
    obj = make_objective(c)
  assert not [r for r in caplog.records if "timestep_scale" in r.getMessage()], caplog.text
  assert isinstance(obj, EDMObjective)
  assert (obj.sigma_data, obj.scaling, obj.sigma_conditional, obj.loss_scale) == (0.5, "edm", 1e-4, 10.0)
  assert DiTConfig.from_config(c.model).timestep_scale == 1.0
  # Only the objective-related fields differ from the RF recipe.
  rf = nemo.get_config()
  assert rf.model.timestep_scale == 0.001 and c.optim.clip_grad_norm == 1.0
  rf.model.timestep_scale = 1.0
  assert rf.model.to_dict() == c.model.to_dict()
  # The RF scale with EDM is still flagged.
  c.model.timestep_scale = 0.001
  with caplog.at_level(logging.WARNING):
    make_objective(c)
  assert "timestep_scale" in caplog.text


def test_train_step_runs_with_edm_on_tiny_sizes():
  c = tiny_edm_config()
  dit_cfg = DiTConfig.from_config(c.model)
  tx = optim.make_optimizer(c)
  state = jax.jit(state_lib.state_init_fn(lambda k: dit.init_params(dit_cfg, k), tx, c))(jax.random.key(0))
  step = jax.jit(step_lib.make_train_step(c, dit.apply_fn(dit_cfg), tx=tx))
  rng = np.random.default_rng(0)
  b, t, h, w = 2, 3, 4, 6
  batch = {"latents": jnp.asarray(rng.standard_normal((b, dit_cfg.in_channels, t, h, w), np.float32)),
           "text_embeddings": jnp.asarray(rng.standard_normal((b, 16, dit_cfg.text_in_channels), np.float32)
                                          .astype(ml_dtypes.bfloat16))}
  s1, m1 = step(state, batch, jax.random.key(1))
  s2, m2 = step(s1, batch, jax.random.key(1))
  for m in (m1, m2):
    assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 0
    assert float(m["grad_nonfinite"]) == 0 and 0 < float(m["grad_norm"]) < np.inf
    # EDM levels: the per-sample σ (= the timestep the objective reports) is positive and unbounded by 1.
    assert float(m["sigma_mean"]) > 0 and float(m["sigma_mean"]) == float(m["timestep_mean"])
  assert int(s2.step) == 2
  moved = jax.tree.leaves(jax.tree.map(lambda a, b_: float(jnp.abs(a - b_).max()), state.params, s2.params))
  assert max(moved) > 0
