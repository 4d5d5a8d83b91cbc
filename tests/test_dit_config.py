"""DiTConfig construction and the trainer-facing helpers of ``v2w_jax.models.dit``."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import nemo, tiny
from v2w_jax.models import dit
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.parallel import rules as R


def test_from_config_2b():
  cfg = DiTConfig.from_config(nemo.model_2b())
  assert (cfg.model_channels, cfg.num_heads, cfg.num_blocks, cfg.head_dim) == (2048, 16, 28, 128)
  assert cfg.rope_dims == (44, 42, 42)
  assert (cfg.patch_in_features, cfg.patch_out_features, cfg.mlp_hidden) == (72, 64, 8192)
  assert cfg.rope_max_patches == (128, 120, 120)
  assert cfg.logical_axis_rules == R.DEFAULT_RULES
  assert hash(cfg) == hash(DiTConfig.from_config(nemo.model_2b().to_dict()))


def test_from_config_rejects_unknown_and_bad_values():
  with pytest.raises(ValueError, match="unknown DiT config fields.*'modle_channels'"):
    DiTConfig.from_config({"modle_channels": 3})
  with pytest.raises(ValueError, match="remat_policy"):
    DiTConfig(remat_policy="sometimes")
  with pytest.raises(ValueError, match="attention_backend"):
    DiTConfig(attention_backend="flash")
  with pytest.raises(ValueError, match="dtype"):
    DiTConfig(dtype="float8")


def test_rules_override_and_freezing():
  rules = [["embed", ["data", "fsdp"]], ["act_length", "context"]]
  cfg = DiTConfig.from_config(nemo.model_2b(), logical_axis_rules=rules)
  assert cfg.logical_axis_rules == (("embed", ("data", "fsdp")), ("act_length", "context"))
  hash(cfg)


def test_from_reference_kwargs(fixtures_dir):
  net = json.loads((fixtures_dir / "dit_tiny" / "config.json").read_text())["net"]
  cfg = DiTConfig.from_reference_kwargs(net, dtype="float32")
  assert cfg.model_channels == net["model_channels"] and cfg.dtype == "float32"
  with pytest.raises(ValueError, match="rope_enable_fps_modulation=True"):
    DiTConfig.from_reference_kwargs({**net, "rope_enable_fps_modulation": True})
  with pytest.raises(ValueError, match="not_a_kwarg"):
    DiTConfig.from_reference_kwargs({**net, "not_a_kwarg": 1})


def test_tiny_config_trains_shapes_and_helpers():
  """configs/tiny.py: abstract params, logical specs, init, apply and a gradient."""
  cfg = DiTConfig.from_config(tiny.get_config().model)
  abstract = dit.abstract_variables(cfg)
  specs = dit.param_logical_specs(abstract)["params"]
  assert specs["blocks"]["mlp"]["layer1"]["kernel"] == jax.sharding.PartitionSpec(R.LAYERS, R.EMBED, R.MLP)
  params = dit.init_params(cfg, jax.random.key(0))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(
      lambda s: (s.shape, s.dtype), dit.unbox(abstract)["params"])
  x, t, text, cond, pad = dit.dummy_inputs(cfg, batch=2, frames=3, height=4, width=6, text_len=5)
  f = dit.apply_fn(cfg)
  args = (x + 1.0, t + 500.0, text + 0.1, cond, pad)

  @jax.jit
  def fwd_bwd(p):
    out, vjp = jax.vjp(lambda q: f(q, *args), p)
    return out, vjp(jnp.ones_like(out))[0]

  out, grads = fwd_bwd(params)
  assert out.shape == (2, cfg.out_channels, 3, 4, 6) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  # Boxed params are accepted too.
  boxed = dit.abstract_variables(cfg)["params"]
  assert jax.eval_shape(f, boxed, *args).shape == out.shape


def test_bf16_params_and_compute_dtypes():
  cfg = DiTConfig.from_config(tiny.get_config().model, param_dtype="bfloat16", dtype="bfloat16")
  params = dit.abstract_params(cfg)
  assert {np.dtype(s.dtype).name for s in jax.tree.leaves(params)} == {"bfloat16"}
  out = jax.eval_shape(dit.apply_fn(cfg), params, *dit.dummy_inputs(cfg))
  assert out.dtype == jnp.float32  # the final layer is an fp32 island


def test_input_validation():
  cfg = DiTConfig.from_config(tiny.get_config().model)
  params = dit.abstract_params(cfg)
  x, t, text, cond, pad = dit.dummy_inputs(cfg, frames=2, height=4, width=4)
  f = dit.apply_fn(cfg)
  with pytest.raises(ValueError, match="timesteps_B_T has shape"):
    jax.eval_shape(f, params, x, jnp.zeros((1, 3)), text, cond, pad)
  with pytest.raises(ValueError, match="channels"):
    jax.eval_shape(f, params, x[:, :3], t, text, cond, pad)
  with pytest.raises(ValueError, match="not divisible by patch"):
    jax.eval_shape(f, params, x[..., :3], t, text, cond[..., :3], pad)
  big = jnp.zeros((1, cfg.in_channels, 1, 2, 2 * 121))
  with pytest.raises(ValueError, match="RoPE limits"):
    jax.eval_shape(f, params, big, t, text, big[:, :1], None)


def test_logical_constraints_are_noops_without_mesh():
  cfg = DiTConfig.from_config(tiny.get_config().model)
  assert nn.meta.get_global_mesh() is None if hasattr(nn.meta, "get_global_mesh") else True
  out = jax.eval_shape(dit.apply_fn(cfg), dit.abstract_params(cfg), *dit.dummy_inputs(cfg))
  assert out.shape[1] == cfg.out_channels
