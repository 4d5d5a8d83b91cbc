"""Context-parallel (Ulysses) attention: equal to the unsharded DiT, forward and gradients.

The multi-device part runs this file as a worker in a subprocess with 8 fake CPU devices (the pytest
process has one): the tiny DiT of ``configs/tiny.py`` in float32 with matmul precision 'highest',
unsharded on one device vs. meshes with context 2 and 4 (and data 2 × fsdp 2 × context 2, and the 14B
config's weights over fsdp × context), with and without ``nn.scan`` and remat. The compiled HLO must contain all-to-alls, so a silent fallback to
all-gathers (or to no context parallelism at all) fails the test. Start-up validation errors are
checked in-process against abstract meshes.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys

import pytest

from configs.nemo_14b import params_over_fsdp_and_context
from v2w_jax.parallel.rules import DEFAULT_RULES

REPO = pathlib.Path(__file__).resolve().parents[1]

NUM_DEVICES = 8
TOL = 1e-5  # max-abs error relative to the largest magnitude of the reference leaf

# (name, mesh sizes, model overrides, number of devices used)
CASES = (
    ("context2", dict(data=1, fsdp=1, context=2), dict(scan_blocks=True, remat_policy="save_attention"), 2),
    ("fsdp2_context4", dict(data=1, fsdp=2, context=4), dict(scan_blocks=False, remat_policy="full"), 8),
    ("data2_fsdp2_context2", dict(data=2, fsdp=2, context=2), dict(scan_blocks=True, remat_policy="none"), 8),
    # configs/nemo_14b.py's layout: weights sharded over fsdp x context.
    ("fsdp2_context2_weights_over_both", dict(data=1, fsdp=2, context=2),
     dict(scan_blocks=True, remat_policy="full", logical_axis_rules=params_over_fsdp_and_context(DEFAULT_RULES)), 4),
)


# ---- worker (runs in the subprocess) -----------------------------------------------------------------


def _count_attention_all_to_all(hlo: str) -> int:
  """All-to-all ops that the self-attention emitted (GSPMD may add others to reshard small tensors)."""
  return sum(1 for line in hlo.splitlines() if "all-to-all(" in line and "self_attn" in line)


def _worker() -> dict:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec

  from configs import tiny
  from v2w_jax.models import dit
  from v2w_jax.models.dit_config import DiTConfig
  from v2w_jax.parallel.mesh import make_mesh

  assert jax.device_count() == NUM_DEVICES, jax.devices()
  base = DiTConfig.from_config(tiny.get_config().model, dtype="float32", param_dtype="float32",
                               attention_backend="xla")
  b, t, h, w, n = 4, 4, 8, 8, 8  # 4×4×4 = 64 tokens per sample
  rng = np.random.default_rng(0)
  inputs = (
      rng.standard_normal((b, base.in_channels, t, h, w)).astype(np.float32),
      rng.uniform(0, 1000, (b, t)).astype(np.float32),  # per-frame timesteps
      rng.standard_normal((b, n, base.text_in_channels)).astype(np.float32),
      (np.arange(t) < 1).astype(np.float32)[None, None, :, None, None] * np.ones((b, 1, 1, h, w), np.float32),
  )
  cotangent = rng.standard_normal((b, base.out_channels, t, h, w)).astype(np.float32)

  ref_cfg = base.replace(scan_blocks=True, remat_policy="none")
  leaves, treedef = jax.tree.flatten(dit.abstract_params(ref_cfg))
  params = jax.tree.unflatten(treedef, [(0.1 * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves])

  def unstack(p: dict, num_blocks: int) -> dict:
    p = dict(p)
    stacked = p.pop("blocks")
    for i in range(num_blocks):
      p[f"blocks_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return p

  def grad_fn(cfg):
    model_apply = dit.apply_fn(cfg)

    def loss(p, *args):
      out = model_apply(p, *args)
      return jnp.sum(out * cotangent), out

    return jax.jit(jax.grad(loss, has_aux=True))

  result = {"cases": {}, "errors": {}, "reference_all_to_all": None}
  with jax.default_matmul_precision("highest"):
    ref_compiled = grad_fn(ref_cfg).lower(params, *inputs).compile()
    result["reference_all_to_all"] = _count_attention_all_to_all(ref_compiled.as_text())
    ref_grads, ref_out = ref_compiled(params, *inputs)
    ref_grads = jax.tree.map(np.asarray, ref_grads)
    ref_out = np.asarray(ref_out)

    for name, sizes, overrides, ndev in CASES:
      cfg = base.replace(**overrides)
      p = params if cfg.scan_blocks else unstack(params, cfg.num_blocks)
      want_grads = ref_grads if cfg.scan_blocks else unstack(ref_grads, cfg.num_blocks)
      mesh = make_mesh(sizes, devices=jax.devices()[:ndev])
      specs = nn.get_partition_spec(dit.abstract_variables(cfg))["params"]
      p = jax.device_put(p, nn.logical_to_mesh_sharding(specs, mesh, cfg.logical_axis_rules))
      args = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
      fn = grad_fn(cfg)
      with jax.set_mesh(mesh):
        compiled = fn.lower(p, *args).compile()
        grads, out = compiled(p, *args)
      hlo = compiled.as_text()
      out_err = float(np.abs(np.asarray(out) - ref_out).max() / np.abs(ref_out).max())
      grad_errs = {
          jax.tree_util.keystr(path): float(np.abs(np.asarray(g) - want).max() / max(np.abs(want).max(), 1e-12))
          for (path, want), g in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(grads))
      }
      worst = max(grad_errs, key=grad_errs.get)
      result["cases"][name] = dict(
          out_rel_err=out_err,
          grad_worst_leaf=worst,
          grad_rel_err=grad_errs[worst],
          num_grad_leaves=len(grad_errs),
          all_to_all=_count_attention_all_to_all(hlo),
      )

    # Errors at trace time: heads (4) not divisible by context 8; 9 tokens not divisible by 2.
    def trace_error(sizes, thw):
      cfg = base.replace(scan_blocks=True, remat_policy="none")
      mesh = make_mesh(sizes)
      shape = dit.dummy_inputs(cfg, batch=1, frames=thw[0], height=thw[1], width=thw[2], text_len=2)[:4]
      try:
        with jax.set_mesh(mesh):
          jax.eval_shape(dit.apply_fn(cfg), params, *shape)
      except ValueError as e:
        return str(e)
      return None

    result["errors"]["heads"] = trace_error(dict(data=1, fsdp=1, context=8), (4, 8, 8))
    result["errors"]["tokens"] = trace_error(dict(data=1, fsdp=4, context=2), (1, 6, 6))
  return result


# ---- tests (pytest process) --------------------------------------------------------------------------


@functools.cache
def _worker_result() -> dict:
  env = dict(os.environ)
  env.update(
      JAX_PLATFORMS="cpu",
      # Fake devices; LLVM at -O0 cuts the CPU compile time several-fold (numerics are unaffected).
      XLA_FLAGS=f"--xla_force_host_platform_device_count={NUM_DEVICES} --xla_backend_optimization_level=0 "
      "--xla_llvm_disable_expensive_passes=true",
      PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
  )
  proc = subprocess.run([sys.executable, __file__, "--worker"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  if proc.returncode:
    pytest.fail(f"context-parallel worker failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_matches_unsharded_forward_and_gradients(name):
  case = _worker_result()["cases"][name]
  assert case["out_rel_err"] <= TOL, case
  assert case["grad_rel_err"] <= TOL, case
  assert case["num_grad_leaves"] > 10, case


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_compiled_with_all_to_all(name):
  res = _worker_result()
  # Forward: q/k/v in, output back; backward: their transposes (per scan body or per block).
  assert res["cases"][name]["all_to_all"] >= 4, res["cases"][name]
  assert res["reference_all_to_all"] == 0


def test_trace_time_errors():
  errors = _worker_result()["errors"]
  assert errors["heads"] is not None and "num_heads=4" in errors["heads"] and "8" in errors["heads"], errors
  assert errors["tokens"] is not None and "9 tokens" in errors["tokens"] and "2" in errors["tokens"], errors


def _abstract_mesh(data: int, fsdp: int, context: int):
  import jax

  return jax.sharding.AbstractMesh((data, fsdp, context), ("data", "fsdp", "context"))


def _tiny_model_cfg():
  from v2w_jax.models.dit_config import DiTConfig

  return DiTConfig(model_channels=64, num_heads=4, num_blocks=1, adaln_lora_dim=8, crossattn_emb_channels=16,
                   crossattn_proj_in_channels=24)


def test_validate_ok_and_degree():
  from v2w_jax.parallel.context_attention import validate_context_parallel

  cfg = _tiny_model_cfg()
  assert validate_context_parallel(cfg, _abstract_mesh(2, 4, 1), latent_thw=(3, 4, 6)) == 1
  assert validate_context_parallel(cfg, _abstract_mesh(1, 2, 4), latent_thw=(4, 8, 8)) == 4
  assert validate_context_parallel(cfg, _abstract_mesh(1, 1, 2)) == 2
  # The 2B model at the recipe's 93 frames, 704×1280: latent 24×88×160.
  from v2w_jax.models.dit_config import DiTConfig

  assert validate_context_parallel(DiTConfig(), _abstract_mesh(1, 1, 8), latent_thw=(24, 88, 160)) == 8


def test_validate_heads_error():
  from v2w_jax.parallel.context_attention import validate_context_parallel

  with pytest.raises(ValueError, match=r"num_heads=4 is not divisible by 8"):
    validate_context_parallel(_tiny_model_cfg(), _abstract_mesh(1, 1, 8))
  with pytest.raises(ValueError, match=r"num_heads=16 is not divisible by 3"):
    from v2w_jax.models.dit_config import DiTConfig

    validate_context_parallel(DiTConfig(), _abstract_mesh(1, 1, 3))


def test_validate_tokens_error():
  from v2w_jax.parallel.context_attention import validate_context_parallel

  # Latent 3×6×6 → 3·3·3 = 27 tokens, not divisible by 2.
  with pytest.raises(ValueError, match=r"27 tokens per sample \(T'·H'·W' = 3·3·3.*not divisible by 2"):
    validate_context_parallel(_tiny_model_cfg(), _abstract_mesh(1, 1, 2), latent_thw=(3, 6, 6))


def test_validate_frames_error():
  from v2w_jax.parallel.context_attention import validate_context_parallel

  # 3·2·2 = 12 tokens split in 2 is fine, but the residual stream is split along T' = 3.
  with pytest.raises(ValueError, match=r"T' = 3 .*not divisible by 2"):
    validate_context_parallel(_tiny_model_cfg(), _abstract_mesh(1, 1, 2), latent_thw=(3, 4, 4))


def test_validate_uses_rules():
  from v2w_jax.parallel import rules as R
  from v2w_jax.parallel.context_attention import context_parallel_plan, validate_context_parallel

  # With act_length unmapped, a context axis of 8 does not split tokens: no CP, no head constraint.
  rules = tuple((k, None if k == R.ACT_LENGTH else v) for k, v in R.DEFAULT_RULES)
  assert validate_context_parallel(_tiny_model_cfg(), _abstract_mesh(1, 1, 8), rules=rules) == 1
  plan = context_parallel_plan(None, _abstract_mesh(2, 2, 2))
  assert plan.context_axes == ("context",) and plan.batch_axes == ("data", "fsdp") and plan.size == 2
  assert context_parallel_plan(None, None) is None  # no ambient mesh in the test process


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
  print(json.dumps(_worker()))
