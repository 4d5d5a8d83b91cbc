"""The DiT attention op: backend selection, XLA path against a naive softmax, cuDNN path on GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v2w_jax.models import attention
from v2w_jax.models.embeddings import apply_rope, rope_angles, rope_exponents


def _naive(q, k, v):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("blhd,bmhd->bhlm", q, k) / np.sqrt(q.shape[-1])
  logits -= logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhlm,bmhd->blhd", w, v)


def _qkv(seed=0, b=2, lq=9, lk=5, h=3, d=16, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape, np.float32), dtype)
               for shape in ((b, lq, h, d), (b, lk, h, d), (b, lk, h, d)))


def test_backend_selection():
  assert attention.resolve_backend("auto", "gpu") == "cudnn"
  assert attention.resolve_backend("auto", "cpu") == "xla"
  assert attention.resolve_backend("auto", "tpu") == "xla"
  assert attention.resolve_backend("xla", "gpu") == "xla"
  assert attention.resolve_backend("cudnn", "cpu") == "cudnn"
  assert attention.resolve_backend("auto") == ("cudnn" if jax.default_backend() == "gpu" else "xla")
  with pytest.raises(ValueError, match="unknown attention backend"):
    attention.resolve_backend("flash")


def test_xla_matches_naive_softmax():
  q, k, v = _qkv()
  with jax.default_matmul_precision("highest"):
    out = jax.jit(lambda *a: attention.dot_product_attention(*a, backend="xla"))(q, k, v)
  assert out.shape == q.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), _naive(q, k, v), atol=2e-6, rtol=1e-5)


def test_xla_keeps_input_dtype():
  q, k, v = _qkv(dtype=jnp.bfloat16)
  out = jax.jit(lambda *a: attention.dot_product_attention(*a, backend="xla"))(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _naive(q, k, v), atol=3e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU with cuDNN")
def test_cudnn_matches_naive_in_bf16():
  q, k, v = _qkv(lq=256, lk=128, h=4, d=64)
  out = jax.jit(lambda *a: attention.dot_product_attention(*a, backend="cudnn"))(q, k, v)
  assert out.dtype == jnp.float32  # computed in bf16, returned in the input dtype
  ref = _naive(*(np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (q, k, v)))
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-2)
  hlo = jax.jit(lambda *a: attention.dot_product_attention(*a, backend="cudnn")).lower(q, k, v).as_text()
  assert "cudnn" in hlo


def test_rope_exponents_and_angles():
  np.testing.assert_array_equal(rope_exponents(10, bf16=False), np.arange(0, 10, 2, dtype=np.float32) / 10)
  rounded = rope_exponents(42, bf16=True)
  assert rounded[1] == np.float32(0.047607421875)  # 1/21 in bf16 (dit_spec §4.5)
  dims = (12, 10, 10)
  full = rope_angles(jnp.arange(3), jnp.arange(4), jnp.arange(5), dims=dims, ratios=(1.0, 3.0, 3.0),
                     bf16_exponents=True)
  assert full.shape == (60, 32)
  np.testing.assert_array_equal(full[:, :16], full[:, 16:])
  # A context-parallel shard's table (frames 1..2) is the matching slice of the full table.
  part = rope_angles(jnp.arange(1, 3), jnp.arange(4), jnp.arange(5), dims=dims, ratios=(1.0, 3.0, 3.0),
                     bf16_exponents=True)
  np.testing.assert_array_equal(part, full[20:60])
  # Token (t=2, h=3, w=4): t angles = 2·f_t, w angles = 4·f_w with theta_w = 1e4·3^(10/8).
  row = np.asarray(full[2 * 20 + 3 * 5 + 4])
  f_t = 10000.0 ** -rope_exponents(12, True)
  f_w = (10000.0 * 3.0 ** (10 / 8)) ** -rope_exponents(10, True)
  np.testing.assert_allclose(row[:6], 2 * f_t, rtol=1e-6)
  np.testing.assert_allclose(row[11:16], 4 * f_w, rtol=1e-6)


def test_apply_rope_is_rotate_half():
  x = jax.random.normal(jax.random.key(1), (1, 3, 2, 8))
  ang = jax.random.uniform(jax.random.key(2), (3, 4)) * 3
  ang = jnp.concatenate([ang, ang], -1)
  out = np.asarray(apply_rope(x, jnp.cos(ang), jnp.sin(ang)))
  xn, a = np.asarray(x), np.asarray(ang)[None, :, None, :4]
  x1, x2 = xn[..., :4], xn[..., 4:]
  np.testing.assert_allclose(out[..., :4], x1 * np.cos(a) - x2 * np.sin(a), atol=1e-6)
  np.testing.assert_allclose(out[..., 4:], x2 * np.cos(a) + x1 * np.sin(a), atol=1e-6)


_SAME_SHARDING_WORKER = r"""
import json
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from v2w_jax.models import attention
from v2w_jax.parallel import mesh as mesh_lib, rules as R
mesh = mesh_lib.make_mesh(dict(data=1, fsdp=2, context=1))
out = {}
for b in (2, 1):
  # q sharded on head_dim, k/v on heads: what FSDP propagation can hand the kernel.
  q = jax.device_put(jnp.ones((b, 8, 4, 16)), NamedSharding(mesh, P(None, None, None, "fsdp")))
  kv = jax.device_put(jnp.ones((b, 6, 4, 16)), NamedSharding(mesh, P(None, None, "fsdp", None)))
  f = jax.jit(lambda q, k, v: attention.same_sharding(q, k, v, R.DEFAULT_RULES))
  with jax.set_mesh(mesh):
    shardings = f.lower(q, kv, kv).compile().output_shardings
  out[b] = [list(s.spec) for s in shardings]
print(json.dumps(out))
"""


def test_cudnn_inputs_get_one_sharding_under_fsdp(repo_root):
  """cuDNN's partitioner rejects q/k/v with different shardings (the FSDP compile failed on 2 GPUs):
  the attention pins all three to batch-over-data-axes, sequence and head_dim whole."""
  import json
  import os
  import subprocess
  import sys

  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", _SAME_SHARDING_WORKER], cwd=repo_root, env=env,
                       capture_output=True, text=True, timeout=300, check=True)
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["2"] == [["fsdp"]] * 3  # batch split over the data axes
  assert out["1"] == [[]] * 3  # a batch the axes do not divide stays whole
