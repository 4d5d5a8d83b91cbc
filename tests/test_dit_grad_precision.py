"""bf16 gradients that are sums over the tokens accumulate in float32, as the reference's do.

JAX differentiates a broadcast into a sum in the operand's dtype. The AdaLN shift/scale/gate of every
block are per-frame bf16 vectors broadcast over H'xW' tokens, and the text projection's bias is added
to every text token; summed in bf16, their gradients (and through them those of the AdaLN MLPs and
the timestep embedder) lose most of their digits, while PyTorch accumulates bf16 sums in float32.
These tests pin the float32 accumulation: on the layers against exact sums, on the DiT through its
gradient program and its per-tensor bf16 error (run through the ``benchmarks/grad_precision.py`` dry
mode).
"""

from __future__ import annotations

import json
import math
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import grad_precision
from configs import tiny
from v2w_jax.convert import dit as convert_dit
from v2w_jax.models import dit
from v2w_jax.models.dit_config import DiTConfig
from v2w_jax.models.layers import BiasedDense, broadcast_fp32_grad, gated_residual, layer_norm, modulate

BF16_ROUNDING = 2.0**-8  # relative error of one rounding to bf16, with margin


def _bf16(key, shape, scale=1.0):
  return (scale * jax.random.normal(key, shape)).astype(jnp.bfloat16)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_broadcast_fp32_grad_forward_is_the_broadcast_and_its_gradient_the_fp32_sum():
  k = jax.random.split(jax.random.key(0), 2)
  v = _bf16(k[0], (1, 2, 1, 1, 64))
  w = jax.random.normal(k[1], (1, 2, 64, 64, 64))  # 4,096 tokens per frame
  shape = w.shape
  out = broadcast_fp32_grad(v, shape)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(out == jnp.broadcast_to(v, shape)))

  def loss(b):
    return lambda v: jnp.sum(b(v, shape).astype(jnp.float32) * w)

  exact = np.sum(np.asarray(w.astype(jnp.bfloat16), np.float64), axis=(2, 3), keepdims=True)
  ours = jax.grad(loss(broadcast_fp32_grad))(v)
  plain = jax.grad(loss(jnp.broadcast_to))(v)
  assert ours.dtype == jnp.bfloat16
  assert _rel(ours, exact) < BF16_ROUNDING
  assert _rel(plain, exact) > BF16_ROUNDING  # the plain broadcast sums in bf16: what this guards against


def test_modulate_and_gated_residual_gradients_are_fp32_sums_over_the_tokens():
  k = jax.random.split(jax.random.key(1), 6)
  x = _bf16(k[0], (1, 2, 32, 64, 64))  # 2,048 tokens per frame
  y = _bf16(k[1], x.shape)
  shift, scale, gate = (_bf16(k[i], (1, 2, 1, 1, 64), 0.5) for i in (2, 3, 4))
  r = jax.random.normal(k[5], x.shape)  # cotangent of the output

  def loss(shift, scale, gate):
    return jnp.sum(gated_residual(modulate(x, shift, scale), gate, y).astype(jnp.float32) * r)

  # Forward: the reference's bf16 formula, bit for bit.
  ln = layer_norm(x)
  plain = ln * (1 + scale) + shift
  assert bool(jnp.all(modulate(x, shift, scale) == plain))
  assert bool(jnp.all(gated_residual(plain, gate, y) == plain + gate * y))

  d_shift, d_scale, d_gate = jax.grad(loss, argnums=(0, 1, 2))(shift, scale, gate)
  f64 = lambda a: np.asarray(a, np.float64)
  g = f64(r.astype(jnp.bfloat16))  # the bf16 cotangent every product starts from
  tokens = (2, 3)
  assert _rel(d_shift, g.sum(tokens, keepdims=True)) < BF16_ROUNDING
  assert _rel(d_scale, (g * f64(ln)).sum(tokens, keepdims=True)) < BF16_ROUNDING
  assert _rel(d_gate, (g * f64(y)).sum(tokens, keepdims=True)) < BF16_ROUNDING


def test_biased_dense_is_nn_dense_with_an_fp32_bias_gradient():
  k = jax.random.split(jax.random.key(2), 3)
  x = _bf16(k[0], (2, 2048, 48))
  kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32)
  ours = BiasedDense(32, ("a", "b"), **kw)
  theirs = nn.Dense(32, use_bias=True, **kw)
  params = nn.meta.unbox(ours.init(k[1], x))["params"]
  same_init = jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)), params,
                           theirs.init(k[1], x)["params"])
  assert all(jax.tree.leaves(same_init)), same_init  # same names, shapes and initial values
  params["bias"] = jax.random.normal(k[2], (32,))
  assert bool(jnp.all(ours.apply({"params": params}, x) == theirs.apply({"params": params}, x)))

  r = jax.random.normal(k[2], (2, 2048, 32))
  bias_grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x).astype(jnp.float32) * r))(params)["bias"]
  exact = np.sum(np.asarray(r.astype(jnp.bfloat16), np.float64), axis=(0, 1))
  assert _rel(bias_grad(ours), exact) < BF16_ROUNDING
  assert _rel(bias_grad(theirs), exact) > BF16_ROUNDING  # nn.Dense sums the bias gradient in bf16


def _bf16_token_sums(jaxpr) -> list[str]:
  """bf16 ``reduce_sum``s of the program (recursing into scan/remat bodies) that add >1 element."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.dtype == jnp.bfloat16:
      if eqn.invars[0].aval.size > eqn.outvars[0].aval.size:
        found.append(f"{eqn.invars[0].aval.str_short()} -> {eqn.outvars[0].aval.str_short()}")
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _bf16_token_sums(sub)
  return found


def test_dit_backward_has_no_bf16_sums():
  cfg = DiTConfig.from_config(tiny.get_config().model, dtype="bfloat16", remat_policy="save_attention")
  params = dit.abstract_params(cfg)
  inputs = dit.dummy_inputs(cfg, frames=2, height=8, width=8, text_len=4)
  grad = jax.grad(lambda p: jnp.mean(jnp.square(dit.apply_fn(cfg)(p, *inputs))))
  closed = jax.make_jaxpr(grad)(params)
  assert _bf16_token_sums(closed.jaxpr) == []


# Gradients that pass through sums over the tokens (the AdaLN path and the text-projection bias).
THROUGH_TOKEN_SUMS = re.compile(r".*(adaln_modulation|t_embedder|t_embedding_norm|crossattn_proj\.0\.bias).*")
# At 1,024 tokens the bf16 sums made these 20-40x the matmul weights' error; summed in float32 they are
# at that level (within the tensor-to-tensor spread of bf16 errors, which reaches ~1.8x for any tensor).
WITHIN_MATMUL_LEVEL = 2.0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
  """The benchmark's CPU dry mode at 4x32x32 latents (1,024 tokens), 64 text tokens."""
  path = tmp_path_factory.mktemp("grad_precision") / "r.json"
  grad_precision.main(["--tiny", "--shapes=4x32x32", "--text_tokens=64", f"--json={path}"])
  return json.loads(path.read_text())["result"]


def test_grad_precision_dry_run_reports_every_parameter(dry_run):
  (shape,) = dry_run["shapes"]
  assert shape["latent"] == [4, 32, 32] and shape["tokens"] == 1024
  cfg = DiTConfig.from_config(tiny.get_config().model)
  assert set(shape["per_tensor"]) == set(convert_dit.key_table(cfg))
  assert all(math.isfinite(v) and v > 0 for v in shape["per_tensor"].values())
  groups = {g["group"] for g in shape["summary"]["groups"]}
  assert {"blocks.*.adaln_modulation_mlp.2.weight", "t_embedder.1.linear_1.weight"} <= groups
  assert 0 < shape["forward_rel_l2"] < 0.02 and abs(shape["grad_norm_change"]) < 0.01


def test_bf16_grads_through_token_sums_are_at_the_matmul_weights_level(dry_run):
  (shape,) = dry_run["shapes"]
  level = shape["summary"]["matmul_weights_max"]
  ratios = {k: v / level for k, v in shape["per_tensor"].items() if THROUGH_TOKEN_SUMS.fullmatch(k)}
  assert len(ratios) > 10
  bad = {k: round(r, 2) for k, r in ratios.items() if r > WITHIN_MATMUL_LEVEL}
  assert not bad, f"bf16 gradient error / matmul weights' ({level:.2e}): {bad}"
