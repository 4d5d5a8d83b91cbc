"""benchmarks/memory_plan.py on CPU: exact state arithmetic, and the derived per-device memory against
XLA's plan of the real multi-device program (tiny config, 4 CPU devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from benchmarks import memory_plan
from configs import nemo_14b, tiny
from v2w_jax.models import dit
from v2w_jax.models.dit_config import DiTConfig


def _abstract_mesh(data, fsdp, context):
  return jax.sharding.AbstractMesh((data, fsdp, context), ("data", "fsdp", "context"))


def test_14b_state_per_device_is_the_arithmetic():
  """fp32 master: 4 B params + 8 B Adam + 4 B EMA per parameter, divided over fsdp x context (the 14B
  config shards weights over both), plus the few small leaves no axis divides."""
  config = nemo_14b.get_config()
  count = dit.count_params(dit.abstract_params(DiTConfig.from_config(config.model)))
  fsdp8 = memory_plan.state_bytes(config, _abstract_mesh(1, 8, 1))
  assert fsdp8 == memory_plan.state_bytes(config, _abstract_mesh(1, 4, 2))
  assert fsdp8["opt_state"] == 2 * fsdp8["params"] + 4  # + Adam's step count
  assert fsdp8["ema"] == fsdp8["params"] == fsdp8["grads_fp32"]
  assert 4 * count / 8 <= fsdp8["params"] < 1.001 * 4 * count / 8
  config.optim.precision, config.model.param_dtype = "reference_bf16", "bfloat16"
  bf16 = memory_plan.state_bytes(config, _abstract_mesh(1, 8, 1))
  assert bf16["params"] * 2 == bf16["ema"] == fsdp8["ema"]
  assert bf16["opt_state"] == fsdp8["opt_state"] // 2 + 2


def test_derived_matches_the_compiled_multi_device_step(tmp_path, repo_root):
  """FSDP 4 on 4 CPU devices, `full` remat, a latent large enough that activations dominate (as at
  720p): the derived row (one-device one-block compile + residuals + exact sharded state) is within 5%
  of XLA's plan of the real 4-device step, and XLA's argument bytes are the state plus the batch."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  out = tmp_path / "plan.json"
  subprocess.run([sys.executable, "-m", "benchmarks.memory_plan", "--tiny", "--fsdp=4", "--latent=4,16,32",
                  "--remat=full", "--derive", f"--json={out}"], cwd=repo_root, env=env, check=True,
                 capture_output=True, timeout=900)
  rows = {r["kind"]: r for r in json.loads(out.read_text())["rows"]}
  compiled, derived = rows["compiled"], rows["derived"]
  assert compiled["mesh"] == derived["mesh"] == {"data": 1, "fsdp": 4, "context": 1}
  cfg = tiny.get_config()
  batch = (4 * 16 * 4 * 16 * 32 * 4 + 4 * cfg.data.text_tokens * cfg.model.crossattn_proj_in_channels * 2) // 4
  assert abs(compiled["compiled"]["argument"] - compiled["state"] - batch) <= 64  # + the rng key
  # One block's input (`full` remat): 4 x 8 x 16 tokens x 64 channels, float32 (the tiny compute dtype).
  assert derived["residuals_per_block"] == 4 * 8 * 16 * 64 * 4
  assert derived["peak"] == pytest.approx(compiled["peak"], rel=0.05)


def test_generation_rows_on_one_device():
  """The sampling loop's arguments hold the DiT weights; the decode row adds them as resident."""
  config = tiny.get_config()
  rows = memory_plan.plan(config, {"data": 1, "fsdp": 1, "context": 1}, (3, 4, 6), mode="generate", num_steps=1)
  loop, decode = rows
  abstract = dit.abstract_params(DiTConfig.from_config(config.model))
  weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  assert loop["dit_weights"] == weights
  assert loop["compiled"]["argument"] >= weights and loop["peak"] > weights
  assert decode["peak"] == decode["compiled"]["peak"] + weights
  assert {r["kind"] for r in rows} == {"compiled"}
